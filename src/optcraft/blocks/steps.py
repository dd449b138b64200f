"""Steps: the blocks that move the parameters."""
from __future__ import annotations

import torch

from ..tensorlist import sqrt, where
from .base import block
from .stats import momentum_of


def debias(mom, damp, step):
    """The sum of the weights an average with `mom` and `damp` has given to gradients after `step`
    steps: `damp * (1 - mom**step) / (1 - mom)`; for an exponential moving average (damp = 1 - mom)
    this is Adam's bias correction `1 - mom**step`."""
    return damp * (1 - mom ** step) / (1 - mom)


@block(reads="elements")
def sgd_step(p, lr, **kwargs):
    """Plain gradient descent: `p <- p - lr * g`."""
    p.add_(p.grad, alpha=-lr)


@block(reads="elements")
def momentum_step(p, lr, grad_avg=None, mom=None, **kwargs):
    """SGD with momentum: `p <- p - lr * grad_avg` (the gradient where no average is kept, or
    while its momentum `mom` is 0: see `average_grad`)."""
    p.add_(momentum_of(p, grad_avg, mom), alpha=-lr)


@block(hypers=dict(eps=1e-8), reads="elements")
def rms_prop_step(p, lr, sqr_avg, eps, grad_avg=None, mom=None, **kwargs):
    """RMSProp (Hinton, Lecture 6e of "Neural Networks for Machine Learning", 2012):
    `p <- p - lr * d / (sqrt(sqr_avg) + eps)` where d is `grad_avg` if kept (and `mom != 0`),
    else g."""
    denom = sqr_avg.sqrt().add_(eps)
    p.addcdiv_(momentum_of(p, grad_avg, mom), denom, value=-lr)


def _adam_denominator(sqr_avg, debias2, eps):
    return sqr_avg.div(debias2).sqrt_().add_(eps)


@block(hypers=dict(eps=1e-5), reads="elements")
def adam_step(p, lr, mom, step, sqr_mom, grad_avg, sqr_avg, eps, **kwargs):
    """Adam (Kingma & Ba, 2015, arXiv:1412.6980), on damped averages:
    `p <- p - lr * (grad_avg / debias1) / (sqrt(sqr_avg / debias2) + eps)`."""
    debias1 = debias(mom, 1 - mom, step)
    root2 = sqrt(debias(sqr_mom, 1 - sqr_mom, step))
    # The same update with debias2 moved out of the square root,
    # `lr sqrt(debias2) / debias1 * grad_avg / (sqrt(sqr_avg) + eps sqrt(debias2))`:
    # one pass over memory fewer than dividing sqr_avg first.
    denom = sqr_avg.sqrt().add_(eps * root2)
    p.addcdiv_(grad_avg, denom, value=-lr * root2 / debias1)
    return p


@block(hypers=dict(eps=1e-5, beta=0.0), static=("beta",), reads="elements")
def radam_step(p, lr, mom, step, sqr_mom, grad_avg, sqr_avg, eps, beta, **kwargs):
    """Rectified Adam (Liu et al., 2020, arXiv:1908.03265), with SAdam's softplus denominator
    when `beta > 0` (Tong et al., 2019, arXiv:1908.00700).

    With `r_inf = 2 / (1 - sqr_mom) - 1` and `r = r_inf - 2 step sqr_mom**step / (1 - sqr_mom**step)`:
    if `r > 5`, `p <- p - lr * v * (grad_avg / debias1) / denom` with
    `v = sqrt((r-4)(r-2) r_inf / ((r_inf-4)(r_inf-2) r))` and
    `denom = sqrt(sqr_avg / debias2) + eps` (softplus(denom, beta) when beta > 0);
    otherwise the unadapted step `p <- p - lr * grad_avg / debias1`.
    """
    debias1 = debias(mom, 1 - mom, step)
    debias2 = debias(sqr_mom, 1 - sqr_mom, step)
    r_inf = 2 / (1 - sqr_mom) - 1
    r = r_inf - 2 * step * sqr_mom ** step / (1 - sqr_mom ** step)
    rectified = r > 5
    if rectified is False:
        p.add_(grad_avg, alpha=-lr / debias1)
        return p
    # Under torch.compile `step` is a tensor, and so is `rectified`: select, do not branch.
    v = sqrt(where(rectified, ((r - 4) * (r - 2) * r_inf) / ((r_inf - 4) * (r_inf - 2) * r), 1.0))
    denom = _adam_denominator(sqr_avg, debias2, eps)
    if beta:
        # softplus(denom, beta) = log1pexp(beta * denom) / beta: the 1 / beta joins the step's scale.
        denom = denom.mul_(beta).log1pexp(nonnegative=True)
    if rectified is not True:
        denom = denom.where(rectified, 1.0)
    scale = where(rectified, beta, 1.0) if beta else 1.0
    p.addcdiv_(grad_avg, denom, value=-lr * v * scale / debias1)
    return p


@block(hypers=dict(eps=1e-8, nu_1=0.7, nu_2=1.0), reads="elements")
def qhadam_step(p, lr, mom, sqr_mom, sqr_avg, nu_1, nu_2, step, grad_avg, eps, **kwargs):
    """Quasi-hyperbolic Adam (Ma & Yarats, 2019, arXiv:1810.06801):
    `p <- p - lr * ((1-nu_1) g + nu_1 grad_avg/debias1) / (sqrt((1-nu_2) g^2 + nu_2 sqr_avg/debias2) + eps)`."""
    debias1 = debias(mom, 1 - mom, step)
    debias2 = debias(sqr_mom, 1 - sqr_mom, step)
    g = p.grad
    denom = sqr_avg.mul(nu_2 / debias2).addcmul_(g, g, value=1 - nu_2).sqrt_().add_(eps)
    # The numerator's two terms are added to p one after the other, so the step makes one
    # parameter-sized temporary (the denominator), not two.
    p.addcdiv_(grad_avg, denom, value=-lr * nu_1 / debias1)
    p.addcdiv_(g, denom, value=-lr * (1 - nu_1))
    return p
