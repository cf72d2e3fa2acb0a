"""Export a run's policy as a Hugging Face folder: `python -m kljax.export WORKDIR OUT_DIR [--checkpoint latest|best|STEP]`.

OUT_DIR receives config.json, model.safetensors, generation_config.json and the tokenizer files (from the
run's `model.hf_path`, else its `task.tokenizer_path`), so

    AutoModelForCausalLM.from_pretrained(OUT_DIR); AutoTokenizer.from_pretrained(OUT_DIR)

load it in transformers. Models with q/k/v biases are written as Qwen2, others as Llama. `best` is the
checkpoint ranked best by the run's `checkpoint.best_metric` (an error if the run tracks none). A model
trained on a built-in symbol task has no Hugging Face tokenizer: its weights are written alone.
"""
from __future__ import annotations

import argparse
import os
import sys


def export(workdir: str, out_dir: str, checkpoint: str = "latest") -> dict:
    """Write the policy of the run in `workdir` to `out_dir`; returns {"step", "out_dir", "tokenizer"}."""
    from kljax.models.hf import to_hf
    from kljax.models.tokenizer import has_tokenizer, load_tokenizer
    from kljax.train import checkpoint as ckpt_lib
    from kljax.train import runs as runs_lib, setup as setup_lib, sharding as shd

    cfg = runs_lib.read_config(workdir)
    ck = cfg.get("checkpoint", None) or {}
    mgr = ckpt_lib.Manager(workdir, None, best_metric=ck.get("best_metric", None) or None,
                           best_mode=ck.get("best_mode", "max"))
    try:
        if checkpoint == "latest":
            step = mgr.latest_step()
        elif checkpoint == "best":
            if not mgr.best_metric:
                raise ValueError(f"--checkpoint=best: the run in {workdir} tracks no checkpoint.best_metric; "
                                 "use --checkpoint=latest or a step")
            step = mgr.best_step()
        else:
            step = int(checkpoint)
            if step not in mgr.all_steps():
                raise ValueError(f"--checkpoint={step}: {workdir} has checkpoints {mgr.all_steps()}")
    finally:
        mgr.close()
    if step is None:
        raise FileNotFoundError(f"{workdir} has no finished checkpoint to export")
    mesh = shd.make_mesh({"data": -1})
    ts, _ = runs_lib.load_state_from(workdir, mesh, step)
    model = ts.model()
    tok_path = setup_lib.hf_path(cfg) or str(cfg.task.get("tokenizer_path", "") or "")
    tokenizer = load_tokenizer(tok_path) if tok_path and has_tokenizer(tok_path) else None
    if tokenizer is None:
        print("kljax.export: the run has no Hugging Face tokenizer (model.hf_path / task.tokenizer_path); "
              "writing the weights only", file=sys.stderr)
    to_hf(model, out_dir, tokenizer=tokenizer)
    return {"step": int(step), "out_dir": os.path.abspath(out_dir), "tokenizer": tok_path if tokenizer else ""}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kljax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a run directory (config.json + checkpoints/)")
    p.add_argument("out_dir", help="folder to write the Hugging Face checkpoint into")
    p.add_argument("--checkpoint", default="latest", help="latest (default), best, or a step number")
    a = p.parse_args(argv)
    try:
        info = export(a.workdir, a.out_dir, a.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {info['step']} of {a.workdir} to {info['out_dir']}"
          + (f" with the tokenizer of {info['tokenizer']}" if info["tokenizer"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
