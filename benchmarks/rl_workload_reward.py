"""Issue 9's workload reward, written as a user writes one (TRL's contract, also kljax's `task.reward`).

    fn(prompts, completions, **columns) -> list[float]

Reward = the fraction of even token ids in the completion. TRL and kljax's benchmark task pass the
completion's token ids as `completion_ids`; Tunix passes only text, where the workload tokenizer writes
token id i as the word "t<i>".
"""


def even_fraction(prompts, completions, completion_ids=None, **kwargs):
    if completion_ids is None:
        completion_ids = [[int(w[1:]) for w in str(c).split() if w[:1] == "t" and w[1:].isdigit()]
                          for c in completions]
    return [sum(1 for t in ids if int(t) % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
