"""scikit-learn's bundled handwritten digits (8×8 images, 10 classes; ``load_digits``, no download).

Records: ``image`` float32[8, 8] in [0, 1] (the 0..16 pixel counts divided by 16) and ``label``
int32. The split is a fixed permutation by ``seed``: the first ``round(test_fraction·n)`` images
form ``test``, the rest ``train`` (n = 1797).
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np
import tensorflow_datasets as tfds

from kljax.tasks import base


class DigitsBuilder(base.TaskBuilder, skip_registration=True):
    name = "digits"
    VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(frozen=True)
class Digits(base.Task):
    test_fraction: float = 0.2
    seed: int = 0

    name = "digits"
    builder_class = DigitsBuilder
    num_classes = 10
    image_shape = (8, 8)

    def __post_init__(self):
        base.check_float("test_fraction", self.test_fraction, 0.0, 1.0)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction={self.test_fraction} must be strictly between 0 and 1")
        base.check_int("seed", self.seed, 0)

    def arrays(self, split: str):
        """``(images float32[n, 8, 8], labels int32[n])`` of ``split``, straight from scikit-learn."""
        from sklearn.datasets import load_digits

        data = load_digits()
        images = (data.images / 16.0).astype(np.float32)
        labels = data.target.astype(np.int32)
        order = np.random.default_rng(np.random.SeedSequence([self.seed, 0xD161])).permutation(len(labels))
        n_test = int(round(self.test_fraction * len(labels)))
        idx = order[:n_test] if split == "test" else order[n_test:]
        return images[idx], labels[idx]

    def split_size(self, split: str) -> int:
        return len(self.arrays(split)[1])

    def features(self):
        return tfds.features.FeaturesDict(
            {"image": tfds.features.Tensor(shape=(8, 8), dtype=np.float32),
             "label": tfds.features.Tensor(shape=(), dtype=np.int32)}
        )

    def generate(self, split: str):
        images, labels = self.arrays(split)
        for x, y in zip(images, labels):
            yield {"image": x, "label": y}

    def reward(self, completions, completion_mask, batch: Dict[str, np.ndarray]) -> np.ndarray:
        """float32[B]: 1 where the predicted class (``completions[:, 0]``, or ``completions`` [B]) is the label."""
        pred = np.asarray(completions)
        pred = pred[:, 0] if pred.ndim == 2 else pred
        labels = np.asarray(batch["label"]).reshape(-1)
        if pred.shape != labels.shape:
            raise ValueError(f"predictions {pred.shape} and batch['label'] {labels.shape} differ in shape")
        return (pred == labels).astype(np.float32)
