"""Steps: the blocks that move the parameters."""
from __future__ import annotations

import torch

from ..tensorlist import TensorList, compiling, sqrt, where
from .base import block


def debias(mom, damp, step):
    """The sum of the weights an average with `mom` and `damp` has given to gradients after `step`
    steps: `damp * (1 - mom**step) / (1 - mom)`; for an exponential moving average (damp = 1 - mom)
    this is Adam's bias correction `1 - mom**step`."""
    return damp * (1 - mom ** step) / (1 - mom)


@block
def sgd_step(p, lr, **kwargs):
    """Plain gradient descent: `p <- p - lr * g`."""
    p.add_(p.grad, alpha=-lr)


@block
def momentum_step(p, lr, grad_avg, **kwargs):
    """SGD with momentum: `p <- p - lr * grad_avg`."""
    p.add_(grad_avg, alpha=-lr)


@block(defaults=dict(eps=1e-8), elementwise=True)
def rms_prop_step(p, lr, sqr_avg, eps, grad_avg=None, **kwargs):
    """RMSProp (Hinton, Lecture 6e of "Neural Networks for Machine Learning", 2012):
    `p <- p - lr * d / (sqrt(sqr_avg) + eps)` where d is `grad_avg` if kept, else g."""
    denom = sqr_avg.sqrt().add_(eps)
    p.addcdiv_(grad_avg if grad_avg is not None else p.grad, denom, value=-lr)


def _adam_denominator(sqr_avg, debias2, eps):
    return sqr_avg.div(debias2).sqrt_().add_(eps)


@block(defaults=dict(eps=1e-5), elementwise=True)
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


def log1pexp(y: TensorList, nonnegative: bool = False) -> TensorList:
    """`log(1 + exp(y))` per element, written over `y` (a temporary of the caller's) in eager mode:
    the softplus with its scale taken out, `softplus(x, b) = log(1 + exp(b x)) / b =
    log1pexp(b x) / b`, so that a block can fold `b` into scalars it multiplies by anyway.

    Eagerly this is torch's softplus kernel (linear above y > 20, as torch's and the notebook's
    `Softplus` are).  Compiled, inductor would write torch's softplus as `log1p(exp(y))` behind a
    threshold; here it is `max(y, 0) + log1p(exp(-|y|))`, the same function, which cannot
    overflow and needs no threshold, and with `nonnegative=True` (`y` a root or a magnitude)
    `y + log(1 + exp(-y))`: `1 + exp(-y)` then lies in (1, 2], where `log` is as accurate as
    `log1p` and cheaper.  The logarithm of `1 + exp(-|y|)` is `log1p_unit`'s (a polynomial for
    float32 on a CPU).  On a CPU these functions, not memory, bound the compiled steps of SAdam,
    SRAdam and BAdam: this form took them from 1.4-1.9x their memory floor to 1.0-1.6x on GPT-2
    small, and `log1p_unit` BAdam's to about 1.3x (BENCHMARKS.md)."""
    if not compiling():
        for t in y:
            torch.ops.aten.softplus.out(t, 1.0, 20.0, out=t)
        return y
    if nonnegative:
        return y.map(lambda t: t + log1p_unit(torch.exp(-t), via_log=True))
    return y.map(lambda t: t.clamp_min(0) + log1p_unit(torch.exp(-t.abs())))


#: `log1p(e) / e` on [0, 1] as a polynomial of degree 8 in `e`, lowest power first: the least-
#: squares fit (float64) at 2,000 Chebyshev nodes of [0, 1], turned into powers of `e`.
_LOG1P_UNIT = (0.9999999705406564, -0.49999501516786754, 0.333192713424934,
               -0.24844369892407042, 0.1911143108034768, -0.13674769705046674,
               0.0783616680131092, -0.029588507389466286, 0.005253457796170311)


def log1p_unit(e: torch.Tensor, via_log: bool = False) -> torch.Tensor:
    """`log1p(e)` for `e` in [0, 1] (`log1pexp`'s `exp(-|y|)`): for float32 on a CPU,
    `e * P(e)` with `P` the polynomial `_LOG1P_UNIT`, a relative error of at most 3.1e-8 in exact
    arithmetic and 1.9e-7 (about 1.6 ulp) evaluated in float32, and 0 at `e = 0` as `log1p`; else
    torch's `log1p(e)` (or `log(1 + e)`, with `via_log`).

    Why: compiled for a CPU, a softplus curve is bound by its transcendental functions, and torch's
    vectorised `log` and `log1p` (Sleef's, accurate to 1 ulp over all floats) cost BAdam's step on
    GPT-2 small about 85 ms each on 2 cores.  Nine multiply-adds suffice on [0, 1]: BAdam compiled
    went from 372 to 301 ms (interleaved A/B)."""
    if e.dtype == torch.float32 and e.device.type == "cpu":
        acc = _LOG1P_UNIT[-1]
        for c in _LOG1P_UNIT[-2::-1]:  # Horner's rule
            acc = acc * e + c
        return e * acc
    return torch.log(1 + e) if via_log else torch.log1p(e)


@block(defaults=dict(eps=1e-5, beta=0.0), static=("beta",), elementwise=True)
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
        denom = log1pexp(denom.mul_(beta), nonnegative=True)
    if rectified is not True:
        denom = denom.where(rectified, 1.0)
    scale = where(rectified, beta, 1.0) if beta else 1.0
    p.addcdiv_(grad_avg, denom, value=-lr * v * scale / debias1)
    return p


@block(defaults=dict(eps=1e-8, nu_1=0.7, nu_2=1.0), elementwise=True)
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
