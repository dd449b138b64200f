"""Learning-rate-free optimizers: Schedule-Free AdamW and SGD (Defazio et al., 2024), a wrapper
that makes any chain schedule-free, and Prodigy (Mishchenko & Defazio, 2023).

The recipes take the reference packages' names and defaults (`schedulefree`'s
`AdamWScheduleFree` and `SGDScheduleFree`, `prodigyopt`'s `Prodigy`): torch's `betas`,
`momentum` and `weight_decay` or fastai's `mom`, `sqr_mom` and `wd`.  Schedule-free optimizers
train at one point and are evaluated at another: call `opt.eval()` before evaluating or saving
the model and `opt.train()` before the next step (optcraft's start in train mode).  See
docs/modern-lr-free.md.
"""
from __future__ import annotations

import math
from functools import partial

from ..blocks.lr_free import (adamw_schedule_free_step, prodigy_d, prodigy_stats,
                              prodigy_stats_sliced, prodigy_step, schedule_free_enter,
                              schedule_free_exit, schedule_free_weights, sgd_schedule_free_step)
from ..engine import GROUP_STATE
from ..hypers import torch_names
from ..optimizer import Optimizer

__all__ = ["AdamWScheduleFree", "SGDScheduleFree", "Prodigy", "schedule_free",
           "schedule_free_blocks"]


def _check_schedule_free(mom, warmup_steps, name):
    if not 0 < mom < 1:
        raise ValueError(f"{name}: the interpolation {name} must be in (0, 1), got {mom!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")


@torch_names
def AdamWScheduleFree(params, lr=0.0025, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0,
                      warmup_steps=0, r=0.0, weight_lr_power=2.0, impl="auto",
                      master_weights=True):
    """Schedule-Free AdamW (Defazio et al., 2024, arXiv:2405.15682), `schedulefree`'s
    `AdamWScheduleFree`: `betas=(mom, sqr_mom)`, `mom` the interpolation
    `y = (1 - mom) z + mom x`; the gradient (taken at `y`) normalised by Adam's bias-corrected
    second moment, plus `wd y`, steps `z`; `x` averages the `z`s with weights
    `(k+1)**r * lr_max**weight_lr_power`; linear warmup over `warmup_steps`."""
    _check_schedule_free(mom, warmup_steps, "mom")
    cbs = [schedule_free_weights, adamw_schedule_free_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd,
                     warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, impl=impl,
                     master_weights=master_weights)


@torch_names
def SGDScheduleFree(params, lr=1.0, mom=0.9, wd=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0,
                    impl="auto", master_weights=True):
    """Schedule-Free SGD (Defazio et al., 2024, arXiv:2405.15682), `schedulefree`'s
    `SGDScheduleFree`: `momentum` (`mom`) is the interpolation `y = (1 - mom) z + mom x`,
    `z <- z - lr (g + wd y)`."""
    _check_schedule_free(mom, warmup_steps, "mom")
    cbs = [schedule_free_weights, sgd_schedule_free_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, wd=wd, warmup_steps=warmup_steps, r=r,
                     weight_lr_power=weight_lr_power, impl=impl, master_weights=master_weights)


def schedule_free_blocks(cbs, at_y=()) -> list:
    """The chain `cbs` made schedule-free: its blocks step `z` (the gradient is taken at `y`, the
    parameters during training), and the average `x` follows (see `schedule_free`).  The blocks
    `at_y` run before, on the parameters at `y` (`l2_reg`: weight decay at `y`, as
    `schedulefree`'s optimizers decay)."""
    return [schedule_free_weights, *list(at_y), schedule_free_enter, *list(cbs),
            schedule_free_exit]


def schedule_free(base, params=None, *, sf_mom=0.9, warmup_steps=0, r=0.0, weight_lr_power=2.0,
                  at_y=(), impl=None, master_weights=None, **hypers) -> Optimizer:
    """Any chain made schedule-free (optax's `schedule_free`): `base` an optcraft `Optimizer`
    (its parameter groups and hyperparameters are taken, its state is not) or a list of blocks
    (then `params` and the chain's hyperparameters are given here).

    The chain steps `z` with the gradient taken at `y`; its step `delta` (scaled by the warmup:
    the chain's step is taken to be proportional to `lr`) moves `z` and the average `x`, with
    `y = (1 - sf_mom) z + sf_mom x` (`sf_mom`, so as not to meet the chain's own `mom`).  Weight
    decay inside the chain acts at `z`; blocks given as `at_y` run first, at `y` (`[l2_reg]`:
    `g <- g + wd y`).  Around plain SGD (`SGD(params, lr)`) this is
    `SGDScheduleFree(params, lr, momentum=sf_mom)` without weight decay, and
    `schedule_free([sgd_step], params, lr=lr, wd=wd, at_y=[l2_reg])` is it with weight decay.

        opt = schedule_free(SGD(model.parameters(), lr=0.5), sf_mom=0.9)
    """
    _check_schedule_free(sf_mom, warmup_steps, "sf_mom")
    if isinstance(base, Optimizer):
        if params is not None:
            raise TypeError("schedule_free: give params only with a list of blocks; an optimizer "
                            "brings its own")
        if len(base.chains) != 1:
            raise ValueError("schedule_free: the optimizer routes parameters to several chains; "
                             "wrap each chain's blocks instead")
        cbs = base.cbs
        params = [{k: v for k, v in g.items() if k != GROUP_STATE} for g in base.param_groups]
        impl = base.impl if impl is None else impl
        master_weights = base.master_weights if master_weights is None else master_weights
    else:
        if params is None:
            raise TypeError("schedule_free: with a list of blocks, give the parameters")
        cbs = base
    opt = Optimizer(params, schedule_free_blocks(cbs, at_y), impl=impl or "auto",
                    master_weights=True if master_weights is None else master_weights,
                    sf_mom=sf_mom, warmup_steps=warmup_steps, r=r,
                    weight_lr_power=weight_lr_power, **hypers)
    return opt


@torch_names
def Prodigy(params, lr=1.0, mom=0.9, sqr_mom=0.999, beta3=None, eps=1e-8, wd=0.0, decouple=True,
            use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0,
            growth_rate=math.inf, slice_p=1, impl="auto", master_weights=True):
    """Prodigy (Mishchenko & Defazio, 2023, arXiv:2306.06101), `prodigyopt`'s `Prodigy`: Adam
    (`betas=(mom, sqr_mom)`) at the step size `d lr`, `d` estimated from sums over every
    parameter (`d0` its start, `d_coef` its scale, `growth_rate` its largest growth per step,
    `beta3` (default `sqrt(sqr_mom)`) the decay of its running sums); decoupled (`decouple`) or
    L2 weight decay `wd`.  `d` is kept per parameter group, as 0-d tensors (no host sync); every
    group must have the same `lr` (Prodigy's own rule, which also allows 0 for some groups, is
    not supported).  `slice_p > 1` estimates `d` from every `slice_p`-th element."""
    if not d0 > 0:
        raise ValueError(f"Prodigy: d0 must be > 0, got {d0!r}")
    if isinstance(slice_p, bool) or not isinstance(slice_p, int) or slice_p < 1:
        raise ValueError(f"Prodigy: slice_p must be an integer >= 1, got {slice_p!r}")
    stats = prodigy_stats if slice_p == 1 else partial(prodigy_stats_sliced, slice_p=slice_p)
    cbs = [stats, prodigy_d, prodigy_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, beta3=beta3, eps=eps, wd=wd,
                     decouple=decouple, use_bias_correction=use_bias_correction,
                     safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
                     growth_rate=growth_rate, impl=impl, master_weights=master_weights)
