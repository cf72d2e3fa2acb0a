"""The path-star graph task G(d, ℓ, N) of Bachmann & Nagarajan, "The Pitfalls of Next-Token
Prediction" (ICML 2024, arXiv 2403.06963), as used in Q♯'s star-graph experiment.

A source node s has d arms, each a chain of ℓ−1 edges; one arm ends at the goal g. The prompt lists
the d·(ℓ−1) edges in random order, then the source and goal; the answer is the arm from s to g.
Generator (B&N ``data/graphs.py::star_graph``): s, g and all other nodes are distinct labels drawn
uniformly from 0..N−1, so N ≥ d·(ℓ−1)+1. Serialization, as in B&N's files::

    u,v|u,v|...|u,v/s,g=   ->   s,n1,...,g<eos>

Vocabulary (B&N's numeral tokenizer plus EOS and PAD): node ids 0..N−1, ``|``=N, ``=``=N+1,
``/``=N+2, ``<eos>``=N+3, ``<pad>``=N+4; V = N+5. Prompt length 3·d·(ℓ−1)+3 (27 for G(2,5,50)),
completion length ℓ+1. ``reverse=True`` writes the path from g back to s (B&N's control that
removes the Clever-Hans shortcut).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds

from kljax.tasks import base


class StarGraphBuilder(base.TaskBuilder, skip_registration=True):
    name = "star_graph"
    VERSION = tfds.core.Version("1.0.0")


def sample_star_graph(rng: np.random.Generator, degree: int, path_len: int, num_nodes: int):
    """One graph: ``(edges [d(ℓ−1), 2] in shuffled order, source, goal, path [ℓ])``.

    A uniformly random injective labelling of the d·(ℓ−1)+1 nodes, exactly as B&N draw them
    (source, goal, path interior, then each other arm's fresh nodes, all distinct).
    """
    labels = rng.permutation(num_nodes)[: degree * (path_len - 1) + 1]
    source = int(labels[0])
    path = [source] + [int(x) for x in labels[1:path_len]]
    edges = list(zip(path[:-1], path[1:]))
    fresh = iter(int(x) for x in labels[path_len:])
    for _ in range(degree - 1):
        node = source
        for _ in range(path_len - 1):
            nxt = next(fresh)
            edges.append((node, nxt))
            node = nxt
    edges = np.asarray(edges, np.int64).reshape(-1, 2)[rng.permutation(len(edges))]
    return edges, source, path[-1], path


def graph_key(edges: np.ndarray, source: int, goal: int) -> Tuple:
    """Order-free identity of a graph instance (edge order is presentation only)."""
    return (source, goal) + tuple(sorted(map(tuple, edges.tolist())))


@dataclasses.dataclass(frozen=True)
class StarGraph(base.SequenceTask):
    """G(degree, path_len, num_nodes); reward 1 for the exact path followed by EOS, else
    ``wrong_reward`` (Q♯'s REINFORCE baseline used −0.1)."""

    degree: int = 2
    path_len: int = 5
    num_nodes: int = 50
    reverse: bool = False
    train_size: int = 50_000
    test_size: int = 2_000
    seed: int = 0
    wrong_reward: float = base.reward_only(0.0)

    name = "star_graph"
    builder_class = StarGraphBuilder

    def __post_init__(self):
        base.check_int("degree", self.degree, 1)
        base.check_int("path_len", self.path_len, 2)
        base.check_int("num_nodes", self.num_nodes, 2)
        base.check_int("train_size", self.train_size, 1)
        base.check_int("test_size", self.test_size, 1)
        base.check_int("seed", self.seed, 0)
        need = self.degree * (self.path_len - 1) + 1
        if self.num_nodes < need:
            raise ValueError(
                f"star graph G(degree={self.degree}, path_len={self.path_len}, num_nodes="
                f"{self.num_nodes}) needs num_nodes >= degree*(path_len-1)+1 = {need} distinct "
                f"node labels; raise num_nodes to at least {need}"
            )
        symbols = [str(i) for i in range(self.num_nodes)] + ["|", "=", "/", base.EOS, base.PAD]
        object.__setattr__(self, "tokenizer", base.SymbolTokenizer(symbols, numeral_count=self.num_nodes))
        object.__setattr__(self, "prompt_len", 3 * self.degree * (self.path_len - 1) + 3)
        object.__setattr__(self, "completion_len", self.path_len + 1)

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "test": self.test_size}[split]

    # -- serialization --------------------------------------------------------------------------

    def prompt_ids(self, edges: np.ndarray, source: int, goal: int) -> List[int]:
        bar, eq, slash = (self.tokenizer.id_of(s) for s in ("|", "=", "/"))
        ids: List[int] = []
        for i, (u, v) in enumerate(edges.tolist()):
            if i:
                ids.append(bar)
            ids += [u, v]
        return ids + [slash, source, goal, eq]

    def answer_ids(self, path: List[int]) -> List[int]:
        return list(path[::-1]) if self.reverse else list(path)

    def _graphs(self, split: str):
        rng = np.random.default_rng(self.split_seed(split, self.seed))
        make = lambda: sample_star_graph(rng, self.degree, self.path_len, self.num_nodes)  # noqa: E731
        if split == "test":
            for _ in range(self.test_size):
                yield make()
            return
        # train excludes every test graph, so the splits are disjoint
        test_keys = {graph_key(e, s, g) for e, s, g, _ in self._graphs("test")}
        yield from base.unique_records(
            make, self.train_size, test_keys, lambda x: graph_key(x[0], x[1], x[2]), "star graphs"
        )

    def generate(self, split: str):
        for edges, source, goal, path in self._graphs(split):
            yield self.make_record(self.prompt_ids(edges, source, goal), self.answer_ids(path))

    # -- reward ---------------------------------------------------------------------------------

    def reward(self, completions, completion_mask, batch: Dict[str, np.ndarray]) -> np.ndarray:
        """float32[B]: 1 if the completion is exactly the path then EOS, else ``wrong_reward``."""
        ok = base.exact_match(completions, completion_mask, batch["target"], batch["target_valid"], self.eos_id)
        return np.where(ok, 1.0, self.wrong_reward).astype(np.float32)

    def parse_prompt(self, prompt, prompt_valid):
        """Inverse of the serialization: ``(edges [E, 2], source, goal)`` from one prompt row."""
        ids = np.asarray(prompt)[np.asarray(prompt_valid) > 0].tolist()
        slash = self.tokenizer.id_of("/")
        k = ids.index(slash)
        body = [t for t in ids[:k] if t != self.tokenizer.id_of("|")]
        return np.asarray(body, np.int64).reshape(-1, 2), ids[k + 1], ids[k + 2]
