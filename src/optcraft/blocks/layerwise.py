"""Layer-wise adaptation: a learning rate per tensor from its norms (LARS/LARC, LAMB)."""
from __future__ import annotations

from functools import partial

import torch

from ..tensorlist import compiling, minimum, read_with_grad, sqrt, stored, where
from .base import block
from .decay import _may_be_nonzero
from .steps import debias


@block(defaults=dict(trust_coeff=0.02, wd=0.0, eps=1e-8), state=("local_lr",))
def larc_layer_lr(p, lr, trust_coeff, wd, eps, clip=True, **kwargs):
    """LARS/LARC's local learning rate (You et al., 2017, arXiv:1708.03888), computed before
    weight decay is applied: `local_lr = lr * trust_coeff * |p| / (|g| + wd |p| + eps)`, clipped to
    at most `lr` when `clip=True` (LARC; `clip=False` is the original LARS)."""
    p_norm, g_norm = read_with_grad(p).norm(), p.grad.norm()
    local_lr = p_norm.mul(lr * trust_coeff).div_(g_norm.add(p_norm, alpha=wd).add_(eps))
    return {"local_lr": minimum(local_lr, lr) if clip else local_lr}


@block
def larc_step(p, local_lr, grad_avg=None, **kwargs):
    """Step with the local learning rate: `p <- p - local_lr * d` (d: grad_avg if kept, else g)."""
    p.add_(grad_avg if grad_avg is not None else p.grad, alpha=-local_lr)


# What both LAMB blocks declare: they take the same hyperparameters and flags.
_LAMB = dict(defaults=dict(eps=1e-6, eps_root=0.0, wd=0.0),
             static=("norm", "wd_in_ratio", "max_ratio"))


def _lamb_direction(p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root, wd, do_wd,
                    wd_in_ratio):
    """LAMB's update direction `u` (see `lamb_step`), computed afresh at each call."""
    debias1 = debias(mom, 1 - mom, step)
    debias2 = debias(sqr_mom, 1 - sqr_mom, step)
    # The same update with the bias corrections taken out of the elementwise work,
    # `u = c * grad_avg / (sqrt(sqr_avg + eps_root * debias2) + eps * sqrt(debias2))` with the
    # scalar `c = sqrt(debias2) / debias1`: one division per element instead of three.
    root2 = sqrt(debias2)
    shift = eps_root * debias2 if isinstance(eps_root, torch.Tensor) or eps_root != 0 else None
    # One temporary: the denominator, which becomes the update in place
    # (`grad_avg * (1 / denom)`, so no second parameter-sized tensor is made eagerly).
    update = sqr_avg.add(shift).sqrt_() if shift is not None else sqr_avg.sqrt()
    update.add_(eps * root2).reciprocal_().mul_(grad_avg).mul_(root2 / debias1)
    if wd_in_ratio and do_wd and _may_be_nonzero(wd):
        update.add_(p, alpha=wd)
    return update


def _lamb_ratio(p, update, norm, max_ratio, flat=False):
    """`q = min(|p| / |u|, max_ratio)`, 1 where either norm is 0."""
    if norm not in ("rms", "l2"):
        raise ValueError(f"lamb_step: norm must be 'rms' or 'l2', got {norm!r}")
    size = (lambda t: t.rms(flat=flat)) if norm == "rms" else (lambda t: t.norm(flat=flat))
    r1, r2 = size(read_with_grad(p)), size(update)
    ratio = r1.div(r2)
    if max_ratio is not None:
        ratio = ratio.clamp_max_(max_ratio)
    return where((r1 == 0) | (r2 == 0), 1.0, ratio)


@block(**_LAMB, transient=("trust_ratio", "lamb_update"), ends_graph=True)
def lamb_trust_ratio(p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root=0.0, wd=0.0,
                     do_wd=True, norm="rms", wd_in_ratio=False, max_ratio=10.0, **kwargs):
    """LAMB's trust ratio `q` (see `lamb_step`), handed to the `lamb_step` after it as
    `trust_ratio`, with the update `u` it was computed from (eagerly) as `lamb_update`; neither is
    kept in the state.

    Compiled, the update is not handed on (it would be a parameter-sized temporary: `lamb_step`
    computes it again in the loop that moves `p`), the graph ends after this block on a CPU
    (`ends_graph`), and the norms are taken of the moments as stored (`tensorlist.stored`): the
    loop that sums the norms then also writes the moments the blocks before it updated, and the
    graph after it reads them back instead of computing them again from the gradient."""
    p, grad_avg, sqr_avg = stored(p), stored(grad_avg), stored(sqr_avg)
    update = _lamb_direction(p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root, wd,
                             do_wd, wd_in_ratio)
    ratio = _lamb_ratio(p, update, norm, max_ratio, flat=True)
    if compiling():
        return {"trust_ratio": ratio}
    return {"trust_ratio": ratio, "lamb_update": update}


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
    handed on, or are computed here when there is none.  The named recipes chain the two
    (`lamb_blocks`): compiled, each then runs in a graph of its own (see `lamb_trust_ratio`).

    The defaults are fastai's `Lamb` (seed 001): RMS norms, ratio clipped at 10, weight decay left
    to a separate `weight_decay` block.  optax's `lamb` is `norm="l2", wd_in_ratio=True,
    max_ratio=None` (no clipping).
    """
    args = (mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root, wd, do_wd, wd_in_ratio)
    update = lamb_update if lamb_update is not None else _lamb_direction(p, *args)
    if trust_ratio is None:
        trust_ratio = _lamb_ratio(p, update, norm, max_ratio)
        if compiling():
            # The step needs the whole update's norm first.  Compiled, the update is computed
            # again in the loop that writes `p` rather than kept: no parameter-sized temporaries.
            update = _lamb_direction(p, *args)
    p.add_(update.mul_(trust_ratio), alpha=-lr)


def lamb_blocks(**flags) -> list:
    """LAMB's two blocks for a chain, `lamb_trust_ratio` then `lamb_step`, with the same keyword
    arguments (`norm`, `wd_in_ratio`, `max_ratio`, see `lamb_step`)."""
    return [partial(lamb_trust_ratio, **flags) if flags else lamb_trust_ratio,
            partial(lamb_step, **flags) if flags else lamb_step]
