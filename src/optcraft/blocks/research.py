"""Building blocks of the research optimizers of seed 003 (a researcher's notebook of Adam variants).

Each is a few lines of `TensorList` arithmetic over a whole bucket.  The recipes that chain them are
in `optcraft.optimizers.research`; the notebook's bugs and what these blocks do instead are listed
in docs/research.md.  Blocks that act on some tensors only take a `predicate` (see
`optcraft.predicates`), evaluated tensor by tensor on shapes, so no parameter group is split.
"""
from __future__ import annotations

import math

import torch

from ..predicates import conv_not_cinEq256_coutLt256, conv_weight
from ..tensorlist import TensorList, where
from .base import PerParam, block, like_param, nonnegative, optional, scalar
from .steps import _adam_denominator, debias


# ---- helpers ---------------------------------------------------------------------------------

def _chosen(p, predicate) -> list[int]:
    """Positions of the tensors of the bucket that `predicate` accepts (a test on metadata)."""
    return [i for i, t in enumerate(p.tensors) if predicate(t)]


def _one_per_channel(t: torch.Tensor) -> torch.Tensor:
    """A `(out, 1, ..., 1)` view of a tensor whose channels each hold one value."""
    return t[(slice(None),) + (slice(0, 1),) * (t.ndim - 1)]


def _ratio(num, den):
    """`num / den` per tensor or channel, 1 where either is 0 (LAMB's convention: an all-zero
    tensor or channel gets the plain step instead of none, or a NaN)."""
    return where((num == 0) | (den == 0), 1.0, num.div(den))


def _zero_where_zero(x: TensorList, of: TensorList) -> TensorList:
    """`x <- 0` where `of == 0`, in place: `where(of == 0, 0, x)` without a second temporary."""
    for t, o in zip(x, of):
        t.masked_fill_(o == 0, 0.0)
    return x


def _size(x: TensorList, norm: str) -> TensorList:
    if norm == "rms":
        return x.rms()
    if norm == "l2":
        return x.norm()
    raise ValueError(f"norm must be 'rms' or 'l2', got {norm!r}")


# ---- gradient transforms ---------------------------------------------------------------------

@block(static=("predicate",))
def centralize_grad(p, predicate=conv_weight, **kwargs):
    """Gradient centralisation (Yong et al., 2020, arXiv:2004.01461), the notebook's `Adam_GCC`:
    for each tensor `predicate` accepts (convolution weights by default),
    `g <- g - mean(g)`, one mean per output channel (over all dimensions but the first).

    Put it first in any chain: the blocks after it see the centred gradient; the tensors in the
    parameters' own `.grad` are not changed (the notebook centred them in place)."""
    chosen = _chosen(p, predicate)
    if not chosen:
        return
    grads = list(p.grad.tensors)
    picked = TensorList([grads[i] for i in chosen])
    means = picked.channel_mean()
    for i, g in zip(chosen, picked.sub(means)):
        grads[i] = g
    p.grad = TensorList(grads)


@block
def scale_grad_to_param(p, **kwargs):
    """PreLAMB's gradient: `g <- g * |p| / |g|` per tensor (L2 norms; 1 where either is 0)."""
    p.grad = p.grad.mul(_ratio(p.norm(), p.grad.norm()))


@block
def sign_grad(p, **kwargs):
    """The unit gradient of SUAdam: `g <- sign(g)`."""
    p.grad = p.grad.sign()


# ---- statistics ------------------------------------------------------------------------------

@block(hypers=dict(sqr_mom=0.99), state=dict(dev_avg=nonnegative(like_param)),
       static=("square",), reads="elements")
def average_deviation(p, sqr_mom, grad_avg=None, dev_avg=None, square=True, **kwargs):
    """How far the gradient strays from its running average, averaged; it must come before the
    block that updates `grad_avg`:
    `r = g / grad_avg` (1 where grad_avg = 0), `dev_avg <- sqr_mom * dev_avg + (1 - sqr_mom) * d`,
    `d = (r - 1)**2` (DuvAdam) or `|r - 1|` with `square=False` (SUAdam)."""
    if dev_avg is None:
        dev_avg = p.grad.zeros_like()
    if grad_avg is None:
        grad_avg = p.grad.zeros_like()
    deviation = _zero_where_zero(p.grad.div(grad_avg).sub_(1), grad_avg)
    dev_avg.mul_(sqr_mom)
    if square:
        dev_avg.addcmul_(deviation, deviation, value=1 - sqr_mom)
    else:
        dev_avg.add_(deviation.abs_(), alpha=1 - sqr_mom)
    return {"dev_avg": dev_avg}


@block(state=dict(layer_scale=scalar))
def mean_abs_param(p, **kwargs):
    """The layer scale of SUAdam and BAdam: `layer_scale = mean(|p|)` per tensor, 1 for an
    all-zero tensor (which the notebook never moved).  Put it before `weight_decay`, so that it
    is the scale of the weights the step starts from."""
    scale = p.norm(1).div([max(n, 1) for n in p.numel()])
    return {"layer_scale": where(scale == 0, 1.0, scale)}


@block(state=dict(init_rms=optional(like_param)))
def record_channel_rms(p, predicate=conv_not_cinEq256_coutLt256, init_rms=None, **kwargs):
    """Remember the RMS of each output channel of the tensors `predicate` accepts, at their first
    step and before any block changes them (put it first in the chain): `init_rms` holds the
    channel's RMS broadcast over the channel (a stride-0 view, one number per channel); the
    tensors the predicate refuses keep `init_rms = None`.  `clear_state()` records them anew."""
    if init_rms is not None:
        return None
    chosen = _chosen(p, predicate)
    if not chosen:
        return {"init_rms": None}
    recorded: list = [None] * len(p)
    for i, rms in zip(chosen, TensorList([p[i] for i in chosen]).channel_rms()):
        recorded[i] = rms.expand_as(p[i])
    if len(chosen) == len(p):
        return {"init_rms": TensorList(recorded)}
    return {"init_rms": PerParam(recorded)}


def _recorded(p, init_rms):
    """The tensors of `p` with a recorded channel RMS, and those RMS as `(out, 1, ...)` views."""
    if init_rms is None:
        return None, None
    found = [(t, r) for t, r in zip(p.tensors, init_rms) if r is not None]
    if not found:
        return None, None
    return TensorList([t for t, _ in found]), TensorList([_one_per_channel(r) for _, r in found])


# ---- steps -----------------------------------------------------------------------------------

def rectifier(sqr_mom, step):
    """RAdam's variance rectification as the notebook writes it: `(tractable, r)` with
    `rho_inf = 2 / (1 - sqr_mom) - 1`, `rho = rho_inf - 2 step sqr_mom**step / (1 - sqr_mom**step)`,
    `tractable = rho > 4` and `r = (rho_inf - 4)(rho_inf - 2) rho / ((rho - 4)(rho - 2) rho_inf)`
    (1 where not tractable).  The adaptive step divides by `sqrt(r * v_hat)`: `r ** -0.5` is the
    rectifier of the paper (Liu et al., 2020, arXiv:1908.03265), rising from 0 towards 1."""
    rho_inf = 2 / (1 - sqr_mom) - 1
    decay = sqr_mom ** step
    rho = rho_inf - 2 * step * decay / (1 - decay)
    tractable = rho > 4
    if tractable is False:  # Python numbers; rho may be exactly 2 or 4 here
        return False, 1.0
    r = (rho_inf - 4) * (rho_inf - 2) * rho / ((rho - 4) * (rho - 2) * rho_inf)
    return tractable, where(tractable, r, 1.0)


@block(hypers=dict(smooth=50.0), static=("smooth", "rectify"), reads="elements")
def sadam_step(p, lr, mom, step, sqr_mom, grad_avg, sqr_avg, smooth, rectify=False, **kwargs):
    """SAdam's step (Tong et al., 2019, arXiv:1908.00700): Adam's with a softplus denominator,
    `p <- p - lr * m_hat / softplus(sqrt(v_hat), smooth)` (`softplus(x, b) = log(1 + exp(b x)) / b`).

    With `rectify=True`, SRAdam's (the notebook's): with `(tractable, r) = rectifier(sqr_mom, step)`,
    `p <- p - lr * m_hat / softplus(sqrt(r * v_hat), smooth)` when tractable, else
    `p <- p - lr * m_hat`."""
    lr_hat = lr / debias(mom, 1 - mom, step)
    tractable, r = rectifier(sqr_mom, step) if rectify else (True, 1.0)
    if tractable is False:
        p.add_(grad_avg, alpha=-lr_hat)
        return
    # m_hat / softplus(sqrt(r v_hat), b) = b m_hat / log1pexp(sqrt(b^2 r v_hat)): the scalars go
    # into one multiplication (no division per element) and b into the step's scale.
    y = sqr_avg.mul(smooth ** 2 * r / debias(sqr_mom, 1 - sqr_mom, step)).sqrt_()
    denom = y.log1pexp(nonnegative=True)
    # Under torch.compile `step` is a tensor, and so is `tractable`: select, do not branch.
    p.addcdiv_(grad_avg, where(tractable, denom, 1.0), value=-lr_hat * where(tractable, smooth, 1.0))


@block(hypers=dict(eps=1e-8))
def stable_adam_step(p, lr, mom, step, sqr_mom, grad_avg, sqr_avg, eps, init_rms=None, **kwargs):
    """StableAdam's step: Adam's, `s = m_hat / (sqrt(v_hat) + eps)`, with each output channel `k`
    of the tensors `record_channel_rms` chose scaled by how much its RMS has grown since their
    first step: `p^k <- p^k - lr * (rms(p^k) / rms(p^k_0)) * s^k` (ratio 1 where either is 0)."""
    chosen, init = _recorded(p, init_rms)
    if chosen is not None:
        ratios = _ratio(chosen.channel_rms(), init)
    # One temporary: the denominator, turned into the step in place.
    s = _adam_denominator(sqr_avg, debias(sqr_mom, 1 - sqr_mom, step), eps)
    s.reciprocal_().mul_(grad_avg)
    if chosen is not None:
        ratios = iter(ratios)
        for t, r in zip(s.tensors, init_rms):
            if r is not None:
                t.mul_(next(ratios))
    p.add_(s, alpha=-lr / debias(mom, 1 - mom, step))


@block
def restore_channel_rms(p, init_rms=None, **kwargs):
    """AdamAWD's adaptive weight decay, after the step: each output channel `k` of the tensors
    `record_channel_rms` chose is brought back to its RMS at their first step,
    `p^k <- p^k * rms(p^k_0) / rms(p^k)` (unchanged where either is 0)."""
    chosen, init = _recorded(p, init_rms)
    if chosen is not None:
        ratios = _ratio(init, chosen.channel_rms())
        chosen.mul_(ratios)


@block(static=("norm",))
def unit_momentum_step(p, lr, grad_avg, norm="rms", **kwargs):
    """UM's step: the momentum scaled to unit size per tensor, `p <- p - lr * m / |m|`, with `|.|`
    the RMS (`norm="rms"`, the notebook's code) or the L2 norm (`norm="l2"`, its formula); no step
    where `m = 0`.  Adam's bias correction `m_hat = m / (1 - mom**t)` cancels in the ratio."""
    size = _size(grad_avg, norm)
    p.add_(grad_avg.mul(where(size == 0, 0.0, size.reciprocal())), alpha=-lr)


@block
def debiased_momentum_step(p, lr, mom, step, grad_avg, **kwargs):
    """Momentum with Adam's bias correction: `p <- p - lr * grad_avg / (1 - mom**step)`."""
    p.add_(grad_avg, alpha=-lr / debias(mom, 1 - mom, step))


@block(static=("root",), reads="elements")
def deviation_step(p, lr, mom, step, sqr_mom, grad_avg, dev_avg, layer_scale=None, root=True,
                   **kwargs):
    """DuvAdam's step `p <- p - lr * m_hat / (1 + sqrt(d_hat))`, or SUAdam's with `root=False`
    and a `layer_scale`: `p <- p - lr * layer_scale * m_hat / (1 + d_hat)`;
    `d_hat = dev_avg / (1 - sqr_mom**step)` (see `average_deviation`)."""
    d_hat = dev_avg.div(debias(sqr_mom, 1 - sqr_mom, step))
    denom = (d_hat.sqrt_() if root else d_hat).add_(1)
    if layer_scale is not None:
        denom.div_(layer_scale)  # `layer_scale * m / denom`, with no second temporary
    p.addcdiv_(grad_avg, denom, value=-lr / debias(mom, 1 - mom, step))


def sign_clamp(x: TensorList, floor) -> TensorList:
    """`x` with every magnitude raised to at least `floor`, signs kept (0 becomes `+floor`): the
    notebook's `sign_clamp`, without its debugger call."""
    raised = x.abs().maximum_(floor)
    return where(x < 0, raised.neg(), raised)


def check_secant(secant: str) -> None:
    """`badam_step`'s `secant` is "softplus" (the algorithm cell) or "sign_clamp" (the code)."""
    if secant not in ("softplus", "sign_clamp"):
        raise ValueError(f"secant must be 'softplus' or 'sign_clamp', got {secant!r}")


@block(hypers=dict(smooth=50.0),
       state=dict(curv_avg=like_param, prev_grad=like_param, prev_step=like_param),
       static=("smooth", "secant"),
       # sign_clamp's floor is a mean over the whole tensor
       reads=lambda secant="softplus", **kwargs: "elements" if secant == "softplus" else "tensor")
def badam_step(p, lr, mom, step, sqr_mom, grad_avg, layer_scale, smooth, curv_avg=None,
               prev_grad=None, prev_step=None, secant="softplus", **kwargs):
    """BAdam's step: a secant estimate of the curvature from the last step `s_{t-1}`,
    `phi = (g_t - g_{t-1}) / softplus(s_{t-1}, smooth)` (`secant="softplus"`, the notebook's
    algorithm cell) or `phi = (g_t - g_{t-1}) / sign_clamp(s_{t-1}, mean|s_{t-1}|)`
    (`secant="sign_clamp"`, its code; 0 where that is 0, an all-zero last step),
    `curv_avg <- sqr_mom * curv_avg + (1 - sqr_mom) * phi` from the second step on,
    `s_t = lr * layer_scale * m_hat / softplus(|curv_avg / (1 - sqr_mom**(t-1))|, smooth)`
    (`s_1 = lr * layer_scale * m_hat`), `p <- p - s_t`.

    The softplus keeps the divisor above log(2) / smooth.  With `sign_clamp` the divisor shrinks
    with the step, and the step with the curvature: on noisy gradients the two feed each other
    until the curvature overflows (docs/research.md)."""
    if curv_avg is None:
        curv_avg, prev_grad, prev_step = [p.grad.zeros_like() for _ in range(3)]
    check_secant(secant)
    first = step == 1
    # softplus(x, b) = log1pexp(b x) / b: each 1 / b joins a scalar the step multiplies by anyway.
    if secant == "softplus":
        divisor, phi_scale = prev_step.mul(smooth).log1pexp(), smooth
    else:
        floor = prev_step.norm(1).div([max(n, 1) for n in prev_step.numel()])
        divisor, phi_scale = sign_clamp(prev_step, floor), 1.0
    phi = _zero_where_zero(p.grad.sub(prev_grad).div_(divisor), divisor)
    del divisor
    # At the first step phi is 0 with `sign_clamp` (nothing moved yet) and g_1 / softplus(0) with
    # `softplus`: curv_avg is only used from the second step on, so reset it at the first.
    curv_avg.mul_(where(first, 0.0, sqr_mom)).add_(
        phi.mul_(where(first, 0.0, (1 - sqr_mom) * phi_scale)))
    del phi
    # s_t is written over s_{t-1}, which nothing needs any more: no new parameter-sized tensor.
    s = prev_step.copy_(grad_avg).mul_(layer_scale)
    scale = lr / debias(mom, 1 - mom, step)
    if first is not True:
        y = curv_avg.mul(smooth / debias(sqr_mom, 1 - sqr_mom, step - 1)).abs_()
        # Compiled, `first` is a tensor: divide by 1 at the first step rather than branch.
        s.div_(where(first, 1.0, y.log1pexp(nonnegative=True)))
        scale = scale * where(first, 1.0, smooth)
    s.mul_(scale)
    p.sub_(s)
    prev_grad.copy_(p.grad)
    return {"curv_avg": curv_avg, "prev_grad": prev_grad, "prev_step": s}


# ---- diagnostics -----------------------------------------------------------------------------

@block(state=dict(update=like_param))
def keep_param(p, update=None, **kwargs):
    """Start recording the step: `update <- p` (first in a chain that ends with `last_update`)."""
    if update is None:
        return {"update": p.clone()}
    update.copy_(p)
    return {"update": update}


@block
def last_update(p, update, **kwargs):
    """`update <- update - p`: after `keep_param` and a chain, the step the chain took,
    `theta_t - theta_{t+1}` (the notebook's `state['update']`), for any optimizer."""
    update.sub_(p)

