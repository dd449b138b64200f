"""Layer-wise adaptation: a learning rate per tensor from its norms (LARS/LARC, LAMB)."""
from __future__ import annotations

from ..tensorlist import minimum, where
from .base import block
from .steps import _adam_denominator, debias


@block(defaults=dict(trust_coeff=0.02, wd=0.0, eps=1e-8), state=("local_lr",))
def larc_layer_lr(p, lr, trust_coeff, wd, eps, clip=True, **kwargs):
    """LARS/LARC's local learning rate (You et al., 2017, arXiv:1708.03888), computed before
    weight decay is applied: `local_lr = lr * trust_coeff * |p| / (|g| + wd |p| + eps)`, clipped to
    at most `lr` when `clip=True` (LARC; `clip=False` is the original LARS)."""
    p_norm, g_norm = p.norm(), p.grad.norm()
    local_lr = p_norm.mul(lr * trust_coeff).div_(g_norm.add(p_norm, alpha=wd).add_(eps))
    return {"local_lr": minimum(local_lr, lr) if clip else local_lr}


@block
def larc_step(p, local_lr, grad_avg=None, **kwargs):
    """Step with the local learning rate: `p <- p - local_lr * d` (d: grad_avg if kept, else g)."""
    p.add_(grad_avg if grad_avg is not None else p.grad, alpha=-local_lr)


@block(defaults=dict(eps=1e-6))
def lamb_step(p, lr, mom, step, sqr_mom, grad_avg, sqr_avg, eps, **kwargs):
    """LAMB (You et al., 2020, arXiv:1904.00962), fastai's form with RMS norms:
    `u = (grad_avg / debias1) / (sqrt(sqr_avg / debias2) + eps)`,
    `q = min(rms(p) / rms(u), 10)` (1 where either is 0), `p <- p - lr * q * u`."""
    debias1 = debias(mom, 1 - mom, step)
    debias2 = debias(sqr_mom, 1 - sqr_mom, step)
    r1 = p.rms()
    update = grad_avg.div(_adam_denominator(sqr_avg, debias2, eps)).div_(debias1)
    r2 = update.rms()
    q = where((r1 == 0) | (r2 == 0), 1.0, r1.div(r2).clamp_max_(10.0))
    p.add_(update.mul_(q), alpha=-lr)
