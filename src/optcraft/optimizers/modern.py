"""The elementwise optimizers people train with today, as named optimizers: Lion, ADOPT, Adan,
MARS, each a short chain of blocks, and Cautious masking (`cautious=True`) on each of them.

Each recipe takes its reference's keyword names and defaults (the `lion-pytorch`, `torch-adopt`
and `adan-pytorch` packages; the authors' code for MARS), fastai's names where they exist
(`mom`, `sqr_mom`, `wd`), `impl` (see `optcraft.engine`) and `master_weights` (see
`optcraft.precision`).  docs/modern-elementwise.md gives each update rule, the reference it is
tested against and the references' known defects.

`cautious=True` (Liang et al., 2024, arXiv:2411.16085) puts the `cautious` block between the
block that computes the update direction and the step: per tensor, the direction `u` is kept
where it agrees in sign with the gradient and rescaled,
`u <- u * (u * g > 0) * numel / (sum(u * g > 0) + 1)`.
"""
from __future__ import annotations

from functools import partial

import torch

from ..blocks import (adam_step, average_grad, average_sqr_grad, l2_reg, lion_step, step_stat,
                      weight_decay)
from ..blocks.elementwise import (adam_update, adan_update, adopt_clip, adopt_update, cautious,
                                  lion_update, mars_correction, prox_decay, update_step)
from ..hypers import torch_names
from ..optimizer import Optimizer

__all__ = ["Lion", "ADOPT", "Adan", "MARS", "adopt_clip"]


def _maybe_cautious(direction, masked: bool) -> list:
    """`direction` (a block handing on `update`), masked by `cautious` if asked, then the step."""
    return [direction, cautious, update_step] if masked else [direction, update_step]


def _wd_divided(params, lr):
    """Parameter groups whose weight decay (either spelling) is divided by `lr`."""
    if isinstance(params, torch.Tensor):
        return params
    out = []
    for group in params:
        if isinstance(group, dict):
            group = {k: v / lr if k in ("wd", "weight_decay") else v for k, v in group.items()}
        out.append(group)
    return out


@torch_names
def Lion(params, lr=1e-4, mom=0.9, sqr_mom=0.99, wd=0.0, decoupled_weight_decay=False,
         cautious=False, impl="auto", master_weights=True):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
    arXiv:2302.06675), the `lion-pytorch` package's `Lion`:
    `p <- p * (1 - lr * wd)`, `p <- p - lr * sign(mom * grad_avg + (1 - mom) * g)`,
    `grad_avg <- sqr_mom * grad_avg + (1 - sqr_mom) * g`.

    Defaults: lr=1e-4, betas=(0.9, 0.99), weight_decay=0.  `decoupled_weight_decay=True` divides
    the weight decay (the recipe's and each group's) by the learning rate given here, as the
    package does: the groups then hold `wd / lr` (a decay set later is taken as it is).  `cautious=True`: Cautious Lion (the sign masked where it disagrees with g)."""
    if decoupled_weight_decay:
        wd = wd / lr
        params = _wd_divided(params, lr)
    cbs = [weight_decay, *(_maybe_cautious(lion_update, True) if cautious else [lion_step])]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def ADOPT(params, lr=1e-3, mom=0.9, sqr_mom=0.9999, eps=1e-6, clip_lambda=adopt_clip, wd=0.0,
          decouple=False, cautious=False, impl="auto", master_weights=True):
    """ADOPT (Taniguchi et al., 2024, arXiv:2411.02853), the `torch-adopt` package's `ADOPT`:
    a parameter's first step only sets `sqr_avg <- g**2`; then
    `n = clamp(g / max(sqrt(sqr_avg), eps), -clip_lambda(k), clip_lambda(k))` (k the updates
    before this one), `grad_avg <- mom * grad_avg + (1 - mom) * n`, `p <- p - lr * grad_avg`, and
    only then `sqr_avg <- sqr_mom * sqr_avg + (1 - sqr_mom) * g**2`.

    Weight decay: `g <- g + wd * p` (from the first step), or with `decouple=True`
    `p <- p * (1 - lr * wd)` before each update.  Defaults: lr=1e-3, betas=(0.9, 0.9999),
    eps=1e-6, clip_lambda=k**0.25 (None: no clipping), weight_decay=0, decouple=False.
    `cautious=True` masks `grad_avg`'s step where it disagrees with g."""
    direction = partial(adopt_update, clip_lambda=clip_lambda, decouple_wd=decouple)
    cbs = [*([] if decouple else [l2_reg]), step_stat, *_maybe_cautious(direction, cautious)]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def _adan(params, lr, mom, diff_mom, sqr_mom, eps, wd, first_step_moments, cautious, impl,
          master_weights):
    direction = partial(adan_update, first_step_moments=first_step_moments) \
        if not first_step_moments else adan_update
    cbs = [step_stat, *_maybe_cautious(direction, cautious), prox_decay]
    return Optimizer(params, cbs, lr=lr, mom=mom, diff_mom=diff_mom, sqr_mom=sqr_mom, eps=eps,
                     wd=wd, impl=impl, master_weights=master_weights)


_adan.__wrapped__.__name__ = "Adan"


def Adan(params, lr=1e-3, betas=(0.02, 0.08, 0.01), eps=1e-8, weight_decay=0.0,
         first_step_moments=True, cautious=False, impl="auto", master_weights=True, *,
         wd=None, **storage):
    """Adan (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
    Deep Models", arXiv:2208.06677), with the `adan-pytorch` package's names and conventions and
    the algorithm of the paper and the authors' code (sail-sg/Adan):

    `d = g - g_prev` (0 at the first step), `grad_avg <- (1 - b1) grad_avg + b1 g`,
    `diff_avg <- (1 - b2) diff_avg + b2 d`, `sqr_avg <- (1 - b3) sqr_avg + b3 (g + (1 - b2) d)**2`,
    bias-corrected, `p <- (p - lr (m + (1 - b2) v) / (sqrt(n) + eps)) / (1 + lr * wd)`.

    `betas=(b1, b2, b3)` are the weights of the new term, as in the package (defaults
    (0.02, 0.08, 0.01)); the groups keep the decays `mom = 1 - b1`, `diff_mom = 1 - b2`,
    `sqr_mom = 1 - b3` (the authors' betas).  Defaults: lr=1e-3, eps=1e-8, weight_decay=0.

    `first_step_moments=False` reproduces the package, which skips the moment updates at a
    parameter's first step (a defect: the first step then moves nothing but the decay, and the
    bias corrections count a step the moments never saw).  The package's `restart_cond` is not
    supported.  `cautious=True` masks the update where it disagrees with g.  `state_bits` and
    `rounding` (`**storage`) are every named optimizer's (see `optcraft.state_codecs`)."""
    if wd is not None:
        if weight_decay:
            raise ValueError("Adan: both 'weight_decay' (torch's name) and 'wd' were given; they "
                             "are the same hyperparameter")
        weight_decay = wd
    b1, b2, b3 = betas
    return _adan(params, lr=lr, mom=1 - b1, diff_mom=1 - b2, sqr_mom=1 - b3, eps=eps,
                 wd=weight_decay, first_step_moments=first_step_moments, cautious=cautious,
                 impl=impl, master_weights=master_weights, **storage)


@torch_names
def MARS(params, lr=3e-3, mom=0.95, sqr_mom=0.99, eps=1e-8, wd=0.0, gamma=0.025, cautious=False,
         impl="auto", master_weights=True):
    """MARS in its AdamW form (Yuan et al., 2024, "MARS: Unleashing the Power of Variance
    Reduction for Training Large Models", arXiv:2411.10438), approximate version (the previous
    step's gradient): `c = g + gamma * mom / (1 - mom) * (g - g_prev)`, `c <- c / max(|c|, 1)`
    per tensor, then AdamW on `c`: `p <- p * (1 - lr * wd)`,
    `p <- p - lr * (m / (1 - mom**t)) / (sqrt(v / (1 - sqr_mom**t)) + eps)`.

    Defaults (the authors' code, AGI-Arena/MARS): lr=3e-3, betas=(0.95, 0.99), eps=1e-8,
    weight_decay=0, gamma=0.025.  Unlike the authors' class, every tensor gets MARS (theirs runs
    plain AdamW on tensors that are not matrices unless `optimize_1d=True`), and the first step's
    correction is 0.  `cautious=True` masks Adam's direction where it disagrees with `c`."""
    head = [weight_decay, mars_correction, partial(average_grad, dampening=True),
            average_sqr_grad, step_stat]
    tail = _maybe_cautious(adam_update, True) if cautious else [adam_step]
    return Optimizer(params, [*head, *tail], lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd,
                     gamma=gamma, impl=impl, master_weights=master_weights)
