"""Feeders that give the shared training loop (``wsi_mil.train.loop``) whole images or
cached image features instead of bags."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_mil.data.augment import Augment


class _Batches:
    """Shared batching over ``n`` samples held as one tensor."""

    data: torch.Tensor

    def __init__(self, ids: list[str], targets: np.ndarray, batch_size: int) -> None:
        self.ids, self.targets, self.batch_size = list(ids), np.asarray(targets, np.float32), batch_size

    def __len__(self) -> int:
        return len(self.ids)

    def n_steps(self) -> int:
        return math.ceil(len(self.ids) / self.batch_size)

    def _x(self, idx: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        return self.data[torch.as_tensor(idx)].float()

    def train_batches(self, order: np.ndarray, rng: np.random.Generator) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        for a in range(0, len(order), self.batch_size):
            idx = np.asarray(order[a:a + self.batch_size])
            yield (self._x(idx, rng),), torch.from_numpy(self.targets[idx])

    def eval_batches(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        for a in range(0, len(self.ids), self.batch_size):
            idx = np.arange(a, min(len(self.ids), a + self.batch_size))
            yield (self.data[torch.as_tensor(idx)].float(),), torch.from_numpy(self.targets[idx])

    def forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor | None = None) -> Any:
        from wsi_mil.mil.models import MILOutput

        logits = model(inputs[0])
        return MILOutput(logits, torch.zeros(len(logits), 0))

    def attention(self, out: Any, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        return [np.zeros(0, np.float32)] * len(inputs[0])


class ImageFeeder(_Batches):
    """Images (N, 1, S, S) in [0, 1] (float16 in memory); training batches augmented."""

    def __init__(self, ids: list[str], targets: np.ndarray, images: torch.Tensor, batch_size: int,
                 augment: Augment | None = None) -> None:
        super().__init__(ids, targets, batch_size)
        self.data, self.augment = images, augment

    def _x(self, idx: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        x = self.data[torch.as_tensor(idx)].float()
        if self.augment is not None and rng is not None:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            x = self.augment(x, gen)
        return x


class FeatureFeeder(_Batches):
    """Cached backbone features (N, D) for a linear probe."""

    def __init__(self, ids: list[str], targets: np.ndarray, features: np.ndarray, batch_size: int = 256) -> None:
        super().__init__(ids, targets, batch_size)
        self.data = torch.from_numpy(np.ascontiguousarray(features, np.float32))
