"""Layer-wise adaptation: a learning rate per tensor from its norms (LARS/LARC, LAMB)."""
from __future__ import annotations

from functools import partial

from ..tensorlist import minimum, sqrt, where
from .base import block, is_zero, scalar, transient
from .stats import momentum_of
from .steps import debias


@block(hypers=dict(trust_coeff=0.02, wd=0.0, eps=1e-8), state=dict(local_lr=scalar))
def larc_layer_lr(p, lr, trust_coeff, wd, eps, clip=True, **kwargs):
    """LARS/LARC's local learning rate (You et al., 2017, arXiv:1708.03888), computed before
    weight decay is applied: `local_lr = lr * trust_coeff * |p| / (|g| + wd |p| + eps)`, clipped to
    at most `lr` when `clip=True` (LARC; `clip=False` is the original LARS)."""
    p_norm, g_norm = p.norm(), p.grad.norm()
    local_lr = p_norm.mul(lr * trust_coeff).div_(g_norm.add(p_norm, alpha=wd).add_(eps))
    return {"local_lr": minimum(local_lr, lr) if clip else local_lr}


@block
def larc_step(p, local_lr, grad_avg=None, mom=None, **kwargs):
    """Step with the local learning rate: `p <- p - local_lr * d` (d: grad_avg if kept and
    `mom != 0`, else g)."""
    p.add_(momentum_of(p, grad_avg, mom), alpha=-local_lr)


# What both LAMB blocks declare: they take the same hyperparameters and flags.
_LAMB = dict(hypers=dict(eps=1e-6, eps_root=0.0, wd=0.0),
             static=("norm", "wd_in_ratio", "max_ratio"), switches=("eps_root", "wd"))


def lamb_direction(p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root, wd, do_wd,
                   wd_in_ratio):
    """LAMB's update direction `u` (see `lamb_step`), computed afresh at each call."""
    debias1 = debias(mom, 1 - mom, step)
    debias2 = debias(sqr_mom, 1 - sqr_mom, step)
    # The same update with the bias corrections taken out of the elementwise work,
    # `u = c * grad_avg / (sqrt(sqr_avg + eps_root * debias2) + eps * sqrt(debias2))` with the
    # scalar `c = sqrt(debias2) / debias1`: one division per element instead of three.
    root2 = sqrt(debias2)
    shift = None if is_zero(eps_root) else eps_root * debias2
    # One temporary: the denominator, which becomes the update in place
    # (`grad_avg * (1 / denom)`, so no second parameter-sized tensor is made).
    update = sqr_avg.add(shift).sqrt_() if shift is not None else sqr_avg.sqrt()
    update.add_(eps * root2).reciprocal_().mul_(grad_avg).mul_(root2 / debias1)
    if wd_in_ratio and do_wd and not is_zero(wd):
        update.add_(p, alpha=wd)
    return update


def lamb_ratio(p, update, norm, max_ratio):
    """`q = min(|p| / |u|, max_ratio)`, 1 where either norm is 0."""
    if norm not in ("rms", "l2"):
        raise ValueError(f"lamb_step: norm must be 'rms' or 'l2', got {norm!r}")
    r1, r2 = (p.rms(), update.rms()) if norm == "rms" else (p.norm(), update.norm())
    ratio = r1.div(r2)
    if max_ratio is not None:
        ratio = ratio.clamp_max_(max_ratio)
    return where((r1 == 0) | (r2 == 0), 1.0, ratio)


@block(**_LAMB, state=dict(trust_ratio=transient, lamb_update=transient))
def lamb_trust_ratio(p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root=0.0, wd=0.0,
                     do_wd=True, norm="rms", wd_in_ratio=False, max_ratio=10.0, **kwargs):
    """LAMB's trust ratio `q` (see `lamb_step`), handed to the `lamb_step` after it as
    `trust_ratio`, with the update `u` it was computed from as `lamb_update`; neither is kept in
    the state.  (The compiled path runs a form of its own that hands on `q` alone: see
    `optcraft.engine.compiled`.)"""
    update = lamb_direction(p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root, wd,
                            do_wd, wd_in_ratio)
    return {"trust_ratio": lamb_ratio(p, update, norm, max_ratio), "lamb_update": update}


@block(**_LAMB)
def lamb_step(p, lr, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root=0.0, wd=0.0,
              do_wd=True, norm="rms", wd_in_ratio=False, max_ratio=10.0, trust_ratio=None,
              lamb_update=None, **kwargs):
    """LAMB (You et al., 2020, arXiv:1904.00962), one implementation for its published forms:

    `u = (grad_avg / debias1) / (sqrt(sqr_avg / debias2 + eps_root) + eps)`,
    `u <- u + wd * p` when `wd_in_ratio` (the paper's and optax's form; `do_wd=False` in a
    parameter's state skips it), `q = min(|p| / |u|, max_ratio)` with `|.|` the RMS (`norm="rms"`,
    fastai) or the L2 norm (`norm="l2"`, the paper and optax), `q = 1` where either norm is 0,
    `p <- p - lr * q * u`.

    `q` (and `u`) are what a `lamb_trust_ratio` block just before it (with the same keywords)
    handed on, or are computed here when it did not.  The named recipes chain the two
    (`lamb_blocks`).

    The defaults are fastai's `Lamb` (seed 001): RMS norms, ratio clipped at 10, weight decay left
    to a separate `weight_decay` block.  optax's `lamb` is `norm="l2", wd_in_ratio=True,
    max_ratio=None` (no clipping).
    """
    update = lamb_update if lamb_update is not None else lamb_direction(
        p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root, wd, do_wd, wd_in_ratio)
    if trust_ratio is None:
        trust_ratio = lamb_ratio(p, update, norm, max_ratio)
    p.add_(update.mul_(trust_ratio), alpha=-lr)


def lamb_blocks(**flags) -> list:
    """LAMB's two blocks for a chain, `lamb_trust_ratio` then `lamb_step`, with the same keyword
    arguments (`norm`, `wd_in_ratio`, `max_ratio`, see `lamb_step`)."""
    return [partial(lamb_trust_ratio, **flags) if flags else lamb_trust_ratio,
            partial(lamb_step, **flags) if flags else lamb_step]
