"""Training machinery shared by every loop: mesh and sharding (`sharding`), train state and step
(`state`), checkpoints (`checkpoint`), metrics (`metrics`); what loops build from a config (`setup`:
`setup(cfg)` gives the task, mesh and policy state), other runs' checkpoints (`runs`), completion
forward passes (`sequences`), generation evaluation (`evaluation`), the step-loop driver (`driver`:
`run_loop`), and the loop registry with shared config checks (`common`). The loops are `sft`, `rl`,
`distill`, `qsharp`, `preference`, `reward_model` and `pipeline`. Import submodules explicitly:
`from kljax.train import sharding, state, checkpoint, metrics`.

The shape of a loop (what `driver.run_loop` does, and what makes kill-and-resume exact)::

    sharding.initialize_distributed_from_env()            # first, before other JAX use
    mesh = sharding.make_mesh(cfg.mesh)
    tx = state.optimizer_from_config(cfg.optim)
    ts = state.create_train_state(lambda rngs: Model(cfg.model, rngs=rngs), tx, mesh, sharding.DEFAULT_RULES, cfg.seed)
    step_fn = state.make_train_step(loss_fn, mesh, state.state_sharding(ts), accum_steps=cfg.accum_steps,
                                    schedule=state.schedule_from_config(cfg.optim))
    it = make_loader(...)
    with checkpoint.Manager(workdir, cfg) as mgr:          # refuses a workdir of another config
        restored = mgr.restore_latest(ts)                 # None on a fresh run
        if restored is not None:
            ts, data_state = restored
            it.set_state(data_state)
        start = int(ts.step)
        writer = metrics.Writer(workdir, resume_step=start if restored is not None else None)
        bar = metrics.ProgressBar(cfg.total_steps, initial=start)
        for _ in range(start, cfg.total_steps):
            ts, m = step_fn(ts, sharding.shard_batch(next(it), mesh))
            s = int(ts.step)
            metrics.check_finite(m, s, mgr.latest_step(), workdir)
            writer.write(s, m)
            bar.update(s, m)
            mgr.save(s, ts, it.get_state(), force=(s == cfg.total_steps))
        writer.close()
    # leaving the `with` waits for the last asynchronous save: the run is complete only then.

`ts.step` counts applied updates, so the checkpoint saved after step s holds `step == s` and the data
iterator state after s batches; resuming continues with batch s+1 and `fold_in(rng, s)`.
"""
