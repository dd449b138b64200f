"""Learning-rate-free blocks: schedule-free averaging and Prodigy's adaptive step size.

Both keep values once per parameter group (`group(...)` state) that a block reading every
parameter at once (`reads="all"`) updates once per group and step:

* schedule-free (Defazio et al., 2024, "The Road Less Scheduled", arXiv:2405.15682): the
  parameters hold `y`, the point the gradient is taken at; the state holds `z`, the base
  optimizer's iterate; the point evaluated, `x`, is an average of the `z`s weighted by
  `(k+1)**r * lr_max**weight_lr_power` and is never stored (`y = (1 - mom) z + mom x`).
  `schedule_free_weights` works out the weight of this step (`ckp1`, the scheduled `sf_lr`);
  `Optimizer.eval()` moves the parameters to `x` and `Optimizer.train()` back to `y` (the blocks'
  `eval_point`).
* Prodigy (Mishchenko & Defazio, 2023, arXiv:2306.06101): Adam whose step size `d` is estimated
  from the sum over every parameter of `<g, p0 - p>` and of `|s|` (`summed` values, kept as
  tensors: no value is read back to the host).
"""
from __future__ import annotations

import math

import torch

from ..tensorlist import TensorList, maximum, minimum, sqrt, where
from .base import block, group, is_zero, like_param, optional, shaped, summed, transient


# ---- schedule-free ---------------------------------------------------------------------------

@block(hypers=dict(warmup_steps=0, r=0.0, weight_lr_power=2.0),
       static=("warmup_steps",),
       state=dict(k=group(0), weight_sum=group(0.0), lr_max=group(-1.0), sf_lr=transient,
                  sf_sched=transient, ckp1=transient),
       reads="all")
def schedule_free_weights(p, lr, warmup_steps, r, weight_lr_power, k=0, weight_sum=0.0,
                          lr_max=-1.0, **kwargs):
    """The weight of this step in schedule-free's average, once per group (numbers only).

    `sched = (k+1) / warmup_steps` during warmup, else 1; `sf_lr = lr * sched`;
    `lr_max <- max(lr_max, sf_lr)`; `weight = (k+1)**r * lr_max**weight_lr_power`;
    `weight_sum <- weight_sum + weight`; `ckp1 = weight / weight_sum` (0 while the sum is 0);
    `k <- k + 1`."""
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    sf_lr = lr * sched
    # numbers, or 0-d tensors (a tensor lr): chosen without reading a tensor's value
    lr_max = maximum(sf_lr, lr_max)
    weight = (k + 1) ** r * lr_max ** weight_lr_power
    weight_sum = weight_sum + weight
    ckp1 = where(weight_sum != 0, weight / where(weight_sum != 0, weight_sum, 1.0), 0.0)
    return dict(k=k + 1, weight_sum=weight_sum, lr_max=lr_max, sf_lr=sf_lr, sf_sched=sched,
                ckp1=ckp1)


def _to_x(p, z=None, beta=0.9):
    if z is not None:
        p.lerp_(z, 1 - 1 / beta)  # x = (y - (1 - beta) z) / beta


def _to_y(p, z=None, beta=0.9):
    if z is not None:
        p.lerp_(z, 1 - beta)  # y = (1 - beta) z + beta x


def _mom_to_x(p, mom, z=None, **kwargs):
    _to_x(p, z, mom)


def _mom_to_y(p, mom, z=None, **kwargs):
    _to_y(p, z, mom)


def _sf_mom_to_x(p, sf_mom, z=None, **kwargs):
    _to_x(p, z, sf_mom)


def _sf_mom_to_y(p, sf_mom, z=None, **kwargs):
    _to_y(p, z, sf_mom)


def _schedule_free_update(p, direction, z, mom, sf_lr, ckp1):
    """`y <- (1 - ckp1) y + ckp1 z + sf_lr (mom (1 - ckp1) - 1) direction`,
    `z <- z - sf_lr direction`: the step of `z` and of the average `x`, written on `y`."""
    p.lerp_(z, ckp1)
    p.add_(direction, alpha=sf_lr * (mom * (1 - ckp1) - 1))
    z.sub_(direction, alpha=sf_lr)


@block(hypers=dict(mom=0.9, wd=0.0), switches=("wd",), state=dict(z=like_param),
       reads="elements", eval_point=(_mom_to_x, _mom_to_y))
def sgd_schedule_free_step(p, mom, wd, sf_lr, ckp1, z=None, do_wd=True, **kwargs):
    """Schedule-free SGD: the direction is `g + wd y` (weight decay at `y`, but where the
    parameter's state holds `do_wd=False`); see `_schedule_free_update`.  `mom` is the
    interpolation `y = (1 - mom) z + mom x`."""
    if z is None:
        z = p.clone()
    g = p.grad if is_zero(wd) or not do_wd else p.grad.add(p, alpha=wd)
    _schedule_free_update(p, g, z, mom, sf_lr, ckp1)
    return dict(z=z)


@block(hypers=dict(mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0), switches=("wd",),
       state=dict(z=like_param, exp_avg_sq=like_param), reads="elements",
       eval_point=(_mom_to_x, _mom_to_y))
def adamw_schedule_free_step(p, mom, sqr_mom, eps, wd, k, sf_lr, ckp1, z=None, exp_avg_sq=None,
                             do_wd=True, **kwargs):
    """Schedule-free AdamW: `exp_avg_sq <- sqr_mom exp_avg_sq + (1 - sqr_mom) g^2`, the direction
    `g / (sqrt(exp_avg_sq / (1 - sqr_mom**k)) + eps) + wd y` (`k` the group's step count,
    this step included; no decay where the state holds `do_wd=False`), then
    `_schedule_free_update`."""
    if z is None:
        z, exp_avg_sq = p.clone(), p.grad.zeros_like()
    g = p.grad
    exp_avg_sq.mul_(sqr_mom).addcmul_(g, g, value=1 - sqr_mom)
    denom = exp_avg_sq.div(1 - sqr_mom ** k).sqrt_().add_(eps)
    direction = g.div(denom)
    if do_wd and not is_zero(wd):
        direction.add_(p, alpha=wd)
    _schedule_free_update(p, direction, z, mom, sf_lr, ckp1)
    return dict(z=z, exp_avg_sq=exp_avg_sq)


@block(hypers=dict(sf_mom=0.9), state=dict(z=like_param, sf_y=transient), reads="tensor",
       eval_point=(_sf_mom_to_x, _sf_mom_to_y))
def schedule_free_enter(p, sf_mom, z=None, **kwargs):
    """Before a wrapped chain (`optimizers.lr_free.schedule_free`): keep `y` (the parameters,
    where the gradient was taken) aside and put `z` in the parameters, for the chain to step."""
    if z is None:
        z = p.clone()
    y = p.clone()
    p.copy_(z)
    return dict(z=z, sf_y=y)


@block(reads="tensor")
def schedule_free_exit(p, sf_mom, sf_sched, ckp1, z, sf_y, **kwargs):
    """After a wrapped chain: its step `delta` of `z` (scaled by the warmup, `sf_sched`: the
    chain's step is taken to be proportional to `lr`), `z <- z + delta`, and the parameters back at
    `y <- (1 - ckp1) y + ckp1 z + (1 - sf_mom (1 - ckp1)) delta`."""
    delta = p.sub(z)
    if not (isinstance(sf_sched, (int, float)) and sf_sched == 1):
        delta.mul_(sf_sched)
    sf_y.lerp_(z, ckp1).add_(delta, alpha=1 - sf_mom * (1 - ckp1))
    if isinstance(sf_sched, (int, float)) and sf_sched == 1:
        z.copy_(p)
    else:
        z.add_(delta)
    p.copy_(sf_y)


# ---- Prodigy ---------------------------------------------------------------------------------

def _unknown(shape):
    return None


_PRODIGY = dict(mom=0.9, sqr_mom=0.999, beta3=None, eps=1e-8, wd=0.0, decouple=True,
                use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0,
                growth_rate=math.inf)
_STATIC = ("beta3", "decouple", "use_bias_correction", "safeguard_warmup")


def _beta3(beta3, sqr_mom):
    return sqrt(sqr_mom) if beta3 is None else beta3


def _dlr(d, lr, k, mom, sqr_mom, use_bias_correction):
    """`d lr`, with Adam's bias correction `sqrt(1 - sqr_mom**(k+1)) / (1 - mom**(k+1))` where
    asked (`k`: the steps taken before this one)."""
    if use_bias_correction:
        return d * lr * sqrt(1 - sqr_mom ** (k + 1)) / (1 - mom ** (k + 1))
    return d * lr


def _slices(t: TensorList, slice_p: int) -> TensorList:
    return TensorList([x.reshape(-1)[::slice_p] for x in t.tensors]) if slice_p > 1 else t


def _prodigy_stats(p, lr, mom, sqr_mom, beta3, wd, decouple, use_bias_correction,
                   safeguard_warmup, d0, slice_p, d=None, k=0, exp_avg=None, exp_avg_sq=None,
                   s=None, p0=None, do_wd=True, **kwargs):
    d = d0 if d is None else d
    beta3 = _beta3(beta3, sqr_mom)
    dlr = _dlr(d, lr, k, mom, sqr_mom, use_bias_correction)
    g = p.grad if decouple or is_zero(wd) or not do_wd else p.grad.add(p, alpha=wd)
    if exp_avg_sq is None:
        exp_avg_sq = p.grad.zeros_like()
        s = _slices(p.grad, slice_p).zeros_like()
        p0 = _slices(p, slice_p).clone()
    if exp_avg is None and not is_zero(mom):
        exp_avg = p.grad.zeros_like()  # (also where mom is set above 0 later)
    sliced_g = _slices(g, slice_p)
    # sum <g, p0 - p> (multiplied by (d / d0) dlr in prodigy_d) and sum |s|, as 0-d tensors
    dots = sliced_g.mul(p0.sub(_slices(p, slice_p))).sum()
    if not is_zero(mom):
        exp_avg.mul_(mom).add_(g, alpha=d * (1 - mom))
    exp_avg_sq.mul_(sqr_mom).addcmul_(g, g, value=d * d * (1 - sqr_mom))
    s.mul_(beta3).add_(sliced_g, alpha=(d / d0) * (d if safeguard_warmup else dlr))
    found = dict(exp_avg_sq=exp_avg_sq, s=s, p0=p0, prodigy_dot=dots, prodigy_s=s.abs().sum())
    if exp_avg is not None:
        found["exp_avg"] = exp_avg
    return found


# exp_avg is missing while mom is 0
_STATS_STATE = dict(exp_avg=optional(like_param), exp_avg_sq=like_param,
                    prodigy_dot=summed, prodigy_s=summed)


@block(hypers=_PRODIGY, static=_STATIC, switches=("wd", "mom"),
       state=dict(**_STATS_STATE, s=like_param, p0=like_param))
def prodigy_stats(p, lr, mom, sqr_mom, beta3, eps, wd, decouple, use_bias_correction,
                  safeguard_warmup, d0, d_coef, growth_rate, **kwargs):
    """Prodigy's first pass (every parameter with a gradient): with `dlr = d lr` (bias corrected
    where asked) and `g` the gradient (plus `wd p` for coupled decay),
    `exp_avg <- mom exp_avg + d (1 - mom) g`, `exp_avg_sq <- sqr_mom exp_avg_sq + d^2 (1 - sqr_mom)
    g^2`, `s <- beta3 s + (d / d0) dlr g` (`d` instead of `dlr` with `safeguard_warmup`), and the
    contributions `<g, p0 - p>` and `sum |s|` to the sums over every parameter (`p0`: the
    parameter at its first step)."""
    return _prodigy_stats(p, lr=lr, mom=mom, sqr_mom=sqr_mom, beta3=beta3, wd=wd,
                          decouple=decouple, use_bias_correction=use_bias_correction,
                          safeguard_warmup=safeguard_warmup, d0=d0, slice_p=1, **kwargs)


@block(hypers=_PRODIGY, static=_STATIC, switches=("wd", "mom"),
       state=dict(**_STATS_STATE,
                  s=shaped(_unknown, "every slice_p-th element of the gradient's running sum"),
                  p0=shaped(_unknown, "every slice_p-th element of the initial parameter")))
def prodigy_stats_sliced(p, slice_p, lr, mom, sqr_mom, beta3, eps, wd, decouple,
                         use_bias_correction, safeguard_warmup, d0, d_coef, growth_rate,
                         **kwargs):
    """`prodigy_stats` on every `slice_p`-th element of each flattened tensor for `s`, `p0` and the
    two sums (Prodigy's `slice_p`: an approximation that saves memory).  `s` and `p0`'s shapes
    depend on `slice_p`, which their specification cannot see: checkpoints do not check them,
    and `optcraft list` does not count them."""
    return _prodigy_stats(p, lr=lr, mom=mom, sqr_mom=sqr_mom, beta3=beta3, wd=wd,
                          decouple=decouple, use_bias_correction=use_bias_correction,
                          safeguard_warmup=safeguard_warmup, d0=d0, slice_p=slice_p, **kwargs)


@block(static=("beta3", "use_bias_correction"),
       state=dict(d=group(None), d_max=group(None), d_numerator=group(0.0), k=group(0),
                  dlr=transient),
       reads="all")
def prodigy_d(p, lr, mom, sqr_mom, beta3, use_bias_correction, d0, d_coef, growth_rate,
              prodigy_dot=0.0, prodigy_s=0.0, d=None, d_max=None, d_numerator=0.0, k=0,
              **kwargs):
    """Prodigy's step size, once per group from the sums over every parameter:
    `d_numerator <- beta3 d_numerator + (d / d0) dlr sum <g, p0 - p>`,
    `d_hat = d_coef d_numerator / sum |s|`; `d <- max(d, d_hat)` while `d` is `d0`;
    `d_max <- max(d_max, d_hat)`; `d <- min(d_max, d growth_rate)`.  Hands on `dlr` (with the `d`
    before this step).  With no gradient anywhere nothing changes; where `sum |s|` is 0 (only
    zero gradients so far) `d` stays and the step is 0, as Prodigy skips it."""
    if not isinstance(prodigy_s, torch.Tensor) and prodigy_s == 0:
        return {}  # no parameter had a gradient
    d = d0 if d is None else d
    d_max = d0 if d_max is None else d_max
    beta3 = _beta3(beta3, sqr_mom)
    dlr = _dlr(d, lr, k, mom, sqr_mom, use_bias_correction)
    numerator = d_numerator * beta3 + (d / d0) * dlr * prodigy_dot
    d_hat = d_coef * numerator / prodigy_s
    new_d = maximum(d_hat, d) if not isinstance(d, torch.Tensor) else \
        torch.where(d == d0, maximum(d_hat, d), d)
    new_d_max = maximum(d_hat, d_max)
    new_d = minimum(new_d_max, new_d * growth_rate)
    progress = prodigy_s != 0
    return dict(d=torch.where(progress, new_d, d), d_max=torch.where(progress, new_d_max, d_max),
                d_numerator=torch.where(progress, numerator, d_numerator), k=k + 1,
                dlr=progress.to(prodigy_s.dtype) * dlr)


@block(static=("decouple",), switches=("wd", "mom"), reads="elements")
def prodigy_step(p, wd, decouple, eps, d, dlr, mom, exp_avg_sq, exp_avg=None, do_wd=True,
                 **kwargs):
    """Prodigy's step (`d` this step's new estimate, `dlr` the one before it):
    `p <- p - wd dlr p` (decoupled decay), then `p <- p - dlr exp_avg / (sqrt(exp_avg_sq) + d eps)`
    (`- dlr d g / (...)` without a first moment, `mom = 0`); no decay where the parameter's
    state holds `do_wd=False`."""
    denom = exp_avg_sq.sqrt().add_(d * eps)
    decay = do_wd and not is_zero(wd)
    if decouple and decay:
        p.add_(p, alpha=-wd * dlr)
    if not is_zero(mom):
        p.addcdiv_(exp_avg, denom, value=-dlr)
    else:
        g = p.grad if decouple or not decay else p.grad.add(p, alpha=wd)
        p.addcdiv_(g, denom, value=-dlr * d)
