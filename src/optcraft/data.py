"""A real dataset that ships inside an installed package: scikit-learn's handwritten digits.

1,797 grey-scale 8x8 images of the digits 0-9 (the UCI optical-recognition test set), read from
the copy inside scikit-learn; nothing is downloaded.  `load_digits()` gives a fixed, stratified
train/validation split (the same for every seed, so runs with different seeds see the same
data), standardised with the training set's per-pixel mean and standard deviation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: The split never changes: runs are comparable across seeds and across versions.
SPLIT_SEED = 0


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, purpose: str):
    """Import `module` or raise `MissingDependency` naming optcraft's `cli` extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependency(f"{purpose} needs {module.split('.')[0]} ({error}); install it "
                                f"with: pip install 'optcraft[cli]'") from error


@dataclass(frozen=True)
class Digits:
    """Standardised digits as torch tensors: `x_*` float32 of shape (n, 64), `y_*` int64 in 0-9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    image_shape: tuple = (8, 8)
    n_classes: int = 10

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def load_digits(val_fraction: float = 0.2) -> Digits:
    """The digits, split into train and validation (stratified by class, `val_fraction` held out).

    Pixels are standardised with the training set's statistics only; a pixel that is constant in
    the training set (some corners are always blank) is centred but not scaled.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    datasets = require("sklearn.datasets", "the digits dataset")
    model_selection = require("sklearn.model_selection", "the digits dataset")
    bunch = datasets.load_digits()
    x_train, x_val, y_train, y_val = model_selection.train_test_split(
        bunch.data, bunch.target, test_size=val_fraction, stratify=bunch.target,
        random_state=SPLIT_SEED)
    x_train = torch.as_tensor(x_train, dtype=torch.float32)
    x_val = torch.as_tensor(x_val, dtype=torch.float32)
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return Digits(x_train=(x_train - mean) / std, y_train=torch.as_tensor(y_train, dtype=torch.int64),
                  x_val=(x_val - mean) / std, y_val=torch.as_tensor(y_val, dtype=torch.int64))
