"""A finite dataset (e.g. SFT conversations) repeated for as many epochs as training needs,
each epoch in its own seeded order: sample i is the same in every run with the same seed, which
is what resuming from `consumed_samples` relies on."""

from __future__ import annotations

import math

import numpy as np
import torch


class Epochs(torch.utils.data.Dataset):
    def __init__(self, dataset, num_samples: int, seed: int):
        size = len(dataset)
        if size == 0:
            raise ValueError("cannot repeat an empty dataset")
        rng = np.random.default_rng(seed)
        epochs = math.ceil(num_samples / size)
        self.dataset = dataset
        self.order = np.concatenate([rng.permutation(size) for _ in range(epochs)])[:num_samples]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.dataset[int(self.order[i])]
