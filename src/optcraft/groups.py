"""Parameter groups from a model: no weight decay for biases, norms and embeddings, layer-wise
learning-rate decay, fastai-style splits for discriminative learning rates.

    groups = param_groups(model, lr=1e-3, wd=0.05, splits=[model.embed, *model.blocks, model.head],
                          layer_decay=0.75)
    opt = torch.optim.AdamW(groups)        # or oc.Adam(groups, lr=1e-3), optax.lamb(groups, 1e-3)

The result is torch's list of group dicts, so it feeds optcraft's and torch's optimizers alike.
Each group holds the keys it needs and nothing else: `params`, `weight_decay` (0 for the groups
that are not decayed, `wd` for the others when given) and `lr` (when `lr` is given).

A per-group learning-rate scale is written into each group's own `lr` (`lr * scale`), not into a
separate key that a scheduler would not know about (timm's `lr_scale` is lost under torch's
schedulers).  torch's schedulers then keep the ratio between groups: StepLR, ExponentialLR,
LambdaLR, CosineAnnealingLR (eta_min=0) and the like multiply each group's own initial lr;
OneCycleLR and CyclicLR take one maximum per group: give them
`max_lr=[g['lr'] for g in groups]`.  With optcraft's optimizers `lr` may also be a schedule:
each group then gets the schedule times its scale.
"""
from __future__ import annotations

import fnmatch
import numbers
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .hypers import even_mults
from .schedules import is_schedule, scale as scaled

__all__ = ["param_groups", "NORM_TYPES", "EMBEDDING_TYPES", "NO_DECAY_TYPES"]

#: Normalisation layers: their gains and shifts are not decayed.
NORM_TYPES: tuple[type, ...] = tuple(t for t in (
    getattr(nn.modules.batchnorm, "_NormBase", None), nn.LayerNorm, nn.GroupNorm,
    nn.LocalResponseNorm, getattr(nn, "RMSNorm", None)) if t is not None)
#: Embedding tables: rows not seen in a batch would shrink for nothing.
EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)
NO_DECAY_TYPES = NORM_TYPES + EMBEDDING_TYPES


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(parameter) -> the module that holds it directly (the first, for shared parameters)."""
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)
    return owners


def _parts(model: nn.Module, splits, names: dict[int, str]) -> list[list[torch.Tensor]]:
    """The ordered parts of the model's parameters: one part, or one per split."""
    everything = [p for p in model.parameters()]
    if splits is None:
        return [everything]
    if callable(splits) and not isinstance(splits, nn.Module):
        splits = splits(model)
    if isinstance(splits, (nn.Module, torch.Tensor)) or not isinstance(splits, Iterable):
        raise TypeError("param_groups: splits must be a list of modules or of parameter lists "
                        "(first layer to last), or a function model -> such a list")
    parts, seen = [], {}
    for i, split in enumerate(splits):
        if isinstance(split, (nn.Module, torch.Tensor)) or not isinstance(split, Iterable):
            split = [split]
        params = []
        for item in split:
            if isinstance(item, nn.Module):
                params += list(item.parameters())
            elif isinstance(item, torch.Tensor):
                params.append(item)
            else:
                raise TypeError(f"param_groups: split {i} holds a {type(item).__name__}; a split "
                                f"is a module, a parameter, or a list of them")
        for p in params:
            if id(p) not in names:
                raise ValueError(f"param_groups: split {i} holds a parameter that is not the "
                                 f"model's")
            if id(p) in seen:
                raise ValueError(f"param_groups: parameter {names[id(p)]!r} is in split "
                                 f"{seen[id(p)]} and in split {i}")
            seen[id(p)] = i
        parts.append(params)
    missing = [names[id(p)] for p in everything if id(p) not in seen]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"param_groups: {len(missing)} parameter(s) in no split: {shown}; the "
                         f"splits must cover the model")
    return parts


def _scales(lr, layer_decay, n: int) -> tuple[list, list[float]]:
    """(base lr per part, scale per part)."""
    if layer_decay is not None:
        if isinstance(layer_decay, bool) or not isinstance(layer_decay, numbers.Real) or \
                not 0 < layer_decay <= 1:
            raise ValueError(f"param_groups: layer_decay must be in (0, 1], got {layer_decay!r}")
        if isinstance(lr, (slice, list, tuple)):
            raise ValueError("param_groups: give either layer_decay or one lr per split (a list "
                             "or a slice), not both")
        if lr is None:
            raise ValueError("param_groups: layer_decay needs lr: each group's lr is "
                             "lr * layer_decay ** (layers above it), so that torch's "
                             "schedulers keep the ratio")
        return [lr] * n, [float(layer_decay) ** (n - 1 - i) for i in range(n)]
    if isinstance(lr, slice):
        if lr.step is not None or lr.stop is None:
            raise ValueError(f"param_groups: a slice lr must be slice(stop) or slice(start, "
                             f"stop), got {lr}")
        values = even_mults(lr.start, lr.stop, n) if lr.start else \
            [lr.stop / 10] * (n - 1) + [lr.stop]
        return values, [1.0] * n
    if isinstance(lr, (list, tuple)):
        if len(lr) != n:
            raise ValueError(f"param_groups: got {len(lr)} learning rates for {n} split(s)")
        return list(lr), [1.0] * n
    return [lr] * n, [1.0] * n


def _check_lr(value) -> None:
    if value is None or is_schedule(value):
        return
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"param_groups: lr must be a number, a schedule, a list or a slice, got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, numbers.Real) and not value >= 0:
        raise ValueError(f"param_groups: lr must be >= 0, got {value!r}")


def param_groups(model: nn.Module, lr=None, wd: float | None = None, *,
                 splits: Sequence | Callable | None = None, layer_decay: float | None = None,
                 no_decay_types: tuple[type, ...] = NO_DECAY_TYPES, no_decay_ndim: int | None = 1,
                 no_decay_names: Iterable[str] = ("bias", "*.bias"),
                 named: bool = False) -> list[dict]:
    """torch's param groups for `model` (see the module docstring).

    Args:
        lr: None (the optimizer's lr for every group), a number or schedule (times each part's
            scale), one value per split, or a slice (fastai: `slice(a, b)` log-uniform from the
            first split to the last, `slice(b)` b/10 for all but the last).
        wd: the weight decay of the decayed groups (None: the optimizer's).
        splits: the parts of the model, first layer to last: each a module, a parameter, or a
            list of them (or a function `model -> list`, fastai's splitter); together they must
            hold every parameter once.
        layer_decay: layer-wise lr decay (ELECTRA, BEiT): split i of n gets
            `lr * layer_decay ** (n - 1 - i)`.
        no_decay_types, no_decay_ndim, no_decay_names: a parameter is not decayed if the module
            holding it is one of `no_decay_types` (norms, embeddings), if it has at most
            `no_decay_ndim` dimensions (biases, gains; None: no rule), or if its name matches
            one of the `fnmatch` patterns `no_decay_names`.
        named: give the parameters as (name, parameter) pairs, so torch records `param_names`
            (and optcraft.optax's masks may use names).

    Returns:
        For each split, a decayed group and a group with `weight_decay=0.0`, empty ones left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if no_decay_ndim is not None and (isinstance(no_decay_ndim, bool) or
                                      not isinstance(no_decay_ndim, int)):
        raise TypeError(f"param_groups: no_decay_ndim must be an int or None, got "
                        f"{no_decay_ndim!r}")
    if isinstance(no_decay_names, str):
        raise TypeError("param_groups: no_decay_names must be a list of patterns, not one string")
    if wd is not None and (isinstance(wd, bool) or not isinstance(wd, numbers.Real) or wd < 0):
        raise ValueError(f"param_groups: wd must be a number >= 0, got {wd!r}")
    patterns = list(no_decay_names)
    names = {id(p): name for name, p in model.named_parameters()}
    if not names:
        raise ValueError("param_groups: the model has no parameters")
    owners = _owners(model)
    parts = _parts(model, splits, names)
    bases, factors = _scales(lr, layer_decay, len(parts))
    for value in bases:
        _check_lr(value)

    def decayed(p: torch.Tensor) -> bool:
        name = names[id(p)]
        return not (isinstance(owners.get(id(p)), tuple(no_decay_types)) or
                    (no_decay_ndim is not None and p.dim() <= no_decay_ndim) or
                    any(fnmatch.fnmatchcase(name, pat) for pat in patterns))

    groups = []
    for params, base, factor in zip(parts, bases, factors):
        for decay in (True, False):
            chosen = [p for p in params if decayed(p) == decay]
            if not chosen:
                continue
            group: dict = {"params": [(names[id(p)], p) for p in chosen] if named else chosen}
            if base is not None:
                group["lr"] = base if factor == 1 else \
                    (scaled(base, factor) if is_schedule(base) else base * factor)
            if not decay:
                group["weight_decay"] = 0.0
            elif wd is not None:
                group["weight_decay"] = wd
            groups.append(group)
    return groups
