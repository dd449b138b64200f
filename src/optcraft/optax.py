"""optax's named optimizers with optax's signatures and numbers, as optcraft chains.

    from optcraft import optax
    opt = optax.lamb(model.named_parameters(), learning_rate=1e-3, weight_decay=0.01,
                     mask=lambda p: p.ndim > 1)

Each factory takes the parameters first (as every torch optimizer does), then optax's arguments
with optax's names and defaults, and returns an `optcraft.Optimizer`: a `torch.optim.Optimizer`
whose `param_groups` hold fastai's names (`lr`, `mom` = b1, `sqr_mom` = b2, `wd`, `eps`,
`eps_root`).  The numbers are optax's: for instance optax's weight decay is added to the update
and scaled by the learning rate (`p <- p - lr * (u + wd * p)`), which is decoupled weight decay.

* `learning_rate` (and any hyperparameter) is a number or a schedule: one of
  `optcraft.schedules`' objects or any callable of the step count (0 at the first step), as in
  optax.
* `mask` (which parameters get weight decay; optax's mask gates the decay only) is None (all), a
  bool, a list of bools aligned with the parameters (in the order of the param groups), a
  callable `param -> bool`, or a collection of parameter names when named parameters
  (`model.named_parameters()`) are given.  It becomes the per-parameter state flag
  `do_wd=False`, honoured inside one param group by every execution path, and saved in
  `state_dict()`.
* Every factory also takes `impl=` and `master_weights=` (see `optcraft.Optimizer`).
"""
from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Iterable

import torch

from .blocks.decay import weight_decay as decoupled_weight_decay
from .blocks.layerwise import lamb_blocks
from .blocks.sign import adam_root_step, lars_step, lion_step, nesterov_step
from .blocks.stats import average_grad, average_sqr_grad, step_stat
from .blocks.steps import adam_step, momentum_step, sgd_step
from .optimizer import Optimizer

__all__ = ["adam", "adamw", "sgd", "lars", "lamb", "lion", "apply_mask", "resolve_mask"]

#: mask forms, for the error messages
_MASK_FORMS = ("None, a bool, a list of bools (one per parameter), a callable param -> bool, or "
               "parameter names (with named parameters)")


def _check_number(who: str, name: str, value, low: float, high: float,
                  high_inclusive: bool = False) -> None:
    """optax's argument names in the error; schedules and tensors are checked by `Optimizer`."""
    if callable(value) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number or a schedule, got "
                        f"{type(value).__name__} {value!r}")
    ok = low <= value and (value <= high if high_inclusive else value < high)
    if not ok or math.isnan(value):
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{who}: {name} must be in [{low:g}, {high:g}{bracket}, got {value!r}")


def _check_flag(who: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be True or False, got {value!r}")


def _flat_params(opt: torch.optim.Optimizer) -> list[tuple[str | None, torch.Tensor]]:
    """(name or None, parameter) in the order of the param groups."""
    found = []
    for group in opt.param_groups:
        names = group.get("param_names") or [None] * len(group["params"])
        found += list(zip(names, group["params"]))
    return found


def resolve_mask(opt: torch.optim.Optimizer, mask, who: str = "mask") -> list[bool]:
    """One bool per parameter of `opt` (in the order of its param groups) from any mask form."""
    named = _flat_params(opt)
    n = len(named)
    if mask is None:
        return [True] * n
    if isinstance(mask, bool):
        return [mask] * n
    if callable(mask) and not isinstance(mask, torch.Tensor):
        values = []
        for name, p in named:
            value = mask(p)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = bool(value)
            if not isinstance(value, bool):
                raise ValueError(f"{who}: the mask function must return True or False, got "
                                 f"{value!r} for parameter {name or tuple(p.shape)}")
            values.append(value)
        return values
    if isinstance(mask, (str, bytes, dict, torch.Tensor)) or not isinstance(mask, Iterable):
        raise TypeError(f"{who}: must be {_MASK_FORMS}; got {type(mask).__name__}")
    items = list(mask)
    if items and all(isinstance(x, str) for x in items):
        names = [name for name, _ in named]
        if any(name is None for name in names):
            raise ValueError(f"{who}: parameter names need named parameters: give "
                             f"model.named_parameters() (or groups with 'param_names')")
        unknown = sorted(set(items) - set(names))
        if unknown:
            raise ValueError(f"{who}: no parameter is named {', '.join(map(repr, unknown))}")
        chosen = set(items)
        return [name in chosen for name in names]
    if all(isinstance(x, bool) for x in items):
        if len(items) != n:
            raise ValueError(f"{who}: got {len(items)} bools for {n} parameters; give one per "
                             f"parameter, in the order of the param groups")
        return items
    raise TypeError(f"{who}: must be {_MASK_FORMS}; got a list holding "
                    f"{sorted({type(x).__name__ for x in items})}")


def apply_mask(opt: torch.optim.Optimizer, mask, flag: str = "do_wd",
               who: str = "mask") -> torch.optim.Optimizer:
    """Set the per-parameter state flag `flag` to False where `mask` is False (True where it is
    True, so a mask applied twice is the last one).  Returns `opt`."""
    values = resolve_mask(opt, mask, who)
    for (_, p), keep in zip(_flat_params(opt), values):
        if keep:
            opt.state[p].pop(flag, None)
        else:
            opt.state[p][flag] = False
    return opt


def _adam_chain(eps_root, nesterov: bool) -> list:
    """optcraft's Adam chain; torch's fused kernel runs it unless eps_root or Nesterov is used."""
    plain = not nesterov and not callable(eps_root) and not isinstance(eps_root, torch.Tensor) \
        and eps_root == 0
    step = adam_step if plain else partial(adam_root_step, nesterov=nesterov)
    return [decoupled_weight_decay, partial(average_grad, dampening=True), average_sqr_grad,
            step_stat, step]


def _check_adam(who, learning_rate, b1, b2, eps, eps_root, nesterov):
    _check_number(who, "learning_rate", learning_rate, 0, math.inf)
    _check_number(who, "b1", b1, 0, 1)
    _check_number(who, "b2", b2, 0, 1)
    _check_number(who, "eps", eps, 0, math.inf)
    _check_number(who, "eps_root", eps_root, 0, math.inf)
    _check_flag(who, "nesterov", nesterov)


def adam(params, learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, *, nesterov=False,
         impl="auto", master_weights=True) -> Optimizer:
    """optax.adam (Kingma & Ba, 2015, arXiv:1412.6980):
    `p <- p - lr * m_hat / (sqrt(v_hat + eps_root) + eps)` with bias-corrected averages;
    `nesterov=True` is NAdam (Dozat, 2016)."""
    _check_adam("adam", learning_rate, b1, b2, eps, eps_root, nesterov)
    extra = {} if eps_root == 0 and not nesterov else {"eps_root": eps_root}
    return Optimizer(params, _adam_chain(eps_root, nesterov), lr=learning_rate, mom=b1,
                     sqr_mom=b2, eps=eps, wd=0.0, impl=impl, master_weights=master_weights,
                     **extra)


def adamw(params, learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=1e-4,
          mask=None, *, nesterov=False, impl="auto", master_weights=True) -> Optimizer:
    """optax.adamw (Loshchilov & Hutter, 2019, arXiv:1711.05101): Adam's update plus
    `weight_decay * p`, scaled by the learning rate; `mask` selects the parameters decayed."""
    _check_adam("adamw", learning_rate, b1, b2, eps, eps_root, nesterov)
    _check_number("adamw", "weight_decay", weight_decay, 0, math.inf)
    extra = {} if eps_root == 0 and not nesterov else {"eps_root": eps_root}
    opt = Optimizer(params, _adam_chain(eps_root, nesterov), lr=learning_rate, mom=b1,
                    sqr_mom=b2, eps=eps, wd=weight_decay, impl=impl,
                    master_weights=master_weights, **extra)
    return apply_mask(opt, mask, who="adamw: mask")


def sgd(params, learning_rate, momentum=None, nesterov=False, *, impl="auto",
        master_weights=True) -> Optimizer:
    """optax.sgd: `p <- p - lr * g`; with `momentum`, `grad_avg <- momentum * grad_avg + g` and
    `p <- p - lr * grad_avg` (Nesterov: `p <- p - lr * (g + momentum * grad_avg)`), torch's SGD
    without dampening."""
    _check_number("sgd", "learning_rate", learning_rate, 0, math.inf)
    _check_flag("sgd", "nesterov", nesterov)
    if momentum is None:
        if nesterov:
            raise ValueError("sgd: nesterov=True needs a momentum (got momentum=None)")
        cbs, hypers = [decoupled_weight_decay, sgd_step], {}
    else:
        _check_number("sgd", "momentum", momentum, 0, 1)
        cbs = [decoupled_weight_decay, average_grad, nesterov_step if nesterov else momentum_step]
        hypers = {"mom": momentum}
    # The (zero) weight-decay block makes the chain one of torch's fused SGD kernels.
    return Optimizer(params, cbs, lr=learning_rate, wd=0.0, impl=impl,
                     master_weights=master_weights, **hypers)


def lars(params, learning_rate, weight_decay=0.0, weight_decay_mask=True, trust_coefficient=0.001,
         eps=0.0, trust_ratio_mask=True, momentum=0.9, nesterov=False, *, impl="auto",
         master_weights=True) -> Optimizer:
    """optax.lars (You et al., 2017, arXiv:1708.03888): `u = g + wd * p`, scaled by
    `trust_coefficient * |p| / (|u| + eps)` (1 where a norm is 0), by the learning rate, then
    momentum.  `weight_decay_mask` and `trust_ratio_mask` take any mask form and become the
    state flags `do_wd` and `do_trust_ratio`."""
    _check_number("lars", "learning_rate", learning_rate, 0, math.inf)
    _check_number("lars", "weight_decay", weight_decay, 0, math.inf)
    _check_number("lars", "trust_coefficient", trust_coefficient, 0, math.inf)
    _check_number("lars", "eps", eps, 0, math.inf)
    _check_number("lars", "momentum", momentum, 0, 1)
    _check_flag("lars", "nesterov", nesterov)
    opt = Optimizer(params, [partial(lars_step, nesterov=nesterov)], lr=learning_rate,
                    mom=momentum, wd=weight_decay, trust_coeff=trust_coefficient, eps=eps,
                    impl=impl, master_weights=master_weights)
    apply_mask(opt, weight_decay_mask, who="lars: weight_decay_mask")
    return apply_mask(opt, trust_ratio_mask, flag="do_trust_ratio", who="lars: trust_ratio_mask")


def lamb(params, learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0,
         mask=None, *, impl="auto", master_weights=True) -> Optimizer:
    """optax.lamb (You et al., 2020, arXiv:1904.00962):

    `u = m_hat / (sqrt(v_hat + eps_root) + eps) + wd * p` (the decay only where `mask` says),
    `p <- p - lr * (|p| / |u|) * u` with L2 norms and a ratio of 1 where either norm is 0.
    """
    _check_adam("lamb", learning_rate, b1, b2, eps, eps_root, False)
    _check_number("lamb", "weight_decay", weight_decay, 0, math.inf)
    steps = lamb_blocks(norm="l2", wd_in_ratio=True, max_ratio=None)
    opt = Optimizer(params, [partial(average_grad, dampening=True), average_sqr_grad, step_stat,
                             *steps],
                    lr=learning_rate, mom=b1, sqr_mom=b2, eps=eps, eps_root=eps_root,
                    wd=weight_decay, impl=impl, master_weights=master_weights)
    return apply_mask(opt, mask, who="lamb: mask")


def lion(params, learning_rate, b1=0.9, b2=0.99, weight_decay=1e-3, mask=None, *, impl="auto",
         master_weights=True) -> Optimizer:
    """optax.lion (Chen et al., 2023, arXiv:2302.06675):
    `p <- p - lr * (sign(b1 * m + (1 - b1) * g) + wd * p)`, then `m <- b2 * m + (1 - b2) * g`."""
    _check_number("lion", "learning_rate", learning_rate, 0, math.inf)
    _check_number("lion", "b1", b1, 0, 1)
    _check_number("lion", "b2", b2, 0, 1)
    _check_number("lion", "weight_decay", weight_decay, 0, math.inf)
    opt = Optimizer(params, [decoupled_weight_decay, lion_step], lr=learning_rate, mom=b1,
                    sqr_mom=b2, wd=weight_decay, impl=impl, master_weights=master_weights)
    return apply_mask(opt, mask, who="lion: mask")

