"""The research optimizers of seed 003 (a researcher's notebook of Adam variants), each a chain of
building blocks with the notebook's defaults, its bugs fixed (docs/research.md lists them).

Notation: `g` the gradient, `m = grad_avg` and `v = sqr_avg` the exponential moving averages of
`g` and `g**2` (`mom`, `sqr_mom` are the notebook's beta1, beta2), `m_hat = m / (1 - mom**t)`,
`v_hat = v / (1 - sqr_mom**t)`, `t` the parameter's own step count.  Weight decay `wd` is
decoupled and torch's (`p <- p * (1 - lr * wd)`, skipped where `state[p]['do_wd']` is False); the
notebook subtracted `wd * p` unscaled by `lr`, i.e. its `weight_decay` is `lr * wd` here.  Every
recipe takes torch's names (`betas`, `weight_decay`), `impl` (see `optcraft.engine`) and
`master_weights` (see `optcraft.precision`).  Each can be built without `lr`, at the Adam family's
1e-3, as torch.optim's optimizers can.
"""
from __future__ import annotations

from functools import partial

import torch

from ..blocks import (adam_step, average_grad, average_sqr_grad, lamb_blocks, step_stat,
                      weight_decay)
from ..blocks.research import (average_deviation, badam_step, centralize_grad, check_secant,
                               debiased_momentum_step, deviation_step, keep_param, last_update,
                               mean_abs_param, record_channel_rms, restore_channel_rms,
                               sadam_step, scale_grad_to_param, sign_grad, stable_adam_step,
                               unit_momentum_step)
from ..engine import Chain, resolve
from ..hypers import torch_names
from ..optimizer import Optimizer
from ..predicates import conv_not_cinEq256_coutLt256, conv_weight

__all__ = ["SAdam", "SRAdam", "LAMB", "AdamGC", "StableAdam", "AdamAWD", "UM", "PreLAMB",
           "DuvAdam", "SUAdam", "BAdam"]

ema_grad = partial(average_grad, dampening=True)


def _adam_moments() -> list:
    return [ema_grad, average_sqr_grad, step_stat]


@torch_names
def SAdam(params, lr=1e-3, mom=0.9, sqr_mom=0.99, smooth=50.0, wd=0.0, impl="auto",
          master_weights=True):
    """SAdam (Tong et al., 2019, arXiv:1908.00700): Adam whose denominator is a softplus,
    `p <- p - lr * m_hat / softplus(sqrt(v_hat), smooth)`, `softplus(x, b) = log(1 + exp(b x)) / b`
    (no `eps`: the softplus is at least log(2) / smooth)."""
    return Optimizer(params, [weight_decay, *_adam_moments(), sadam_step], lr=lr, mom=mom,
                     sqr_mom=sqr_mom, smooth=smooth, wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def SRAdam(params, lr=1e-3, mom=0.9, sqr_mom=0.999, smooth=50.0, wd=0.0, impl="auto",
           master_weights=True):
    """SRAdam (the notebook's): RAdam (Liu et al., 2020, arXiv:1908.03265) with SAdam's softplus.
    `rho_inf = 2 / (1 - sqr_mom) - 1`, `rho_t = rho_inf - 2 t sqr_mom**t / (1 - sqr_mom**t)`; if
    `rho_t > 4`, `r_t = (rho_inf-4)(rho_inf-2) rho_t / ((rho_t-4)(rho_t-2) rho_inf)` and
    `p <- p - lr * m_hat / softplus(sqrt(r_t v_hat), smooth)`; else `p <- p - lr * m_hat`."""
    return Optimizer(params, [weight_decay, *_adam_moments(), partial(sadam_step, rectify=True)],
                     lr=lr, mom=mom, sqr_mom=sqr_mom, smooth=smooth, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def LAMB(params, lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0, impl="auto", master_weights=True):
    """LAMB as the paper (You et al., 2020, arXiv:1904.00962) and the notebook write it:
    `A = m_hat / (sqrt(v_hat) + eps) + wd * p`, `p <- p - lr * (|p| / |A|) * A` per tensor, L2
    norms, ratio unclipped (1 where either norm is 0).  It is `lamb_blocks`, as fastai's `Lamb` is,
    with `norm="l2", wd_in_ratio=True, max_ratio=None` (fastai: RMS norms, ratio clipped at 10,
    weight decay outside the ratio)."""
    paper = lamb_blocks(norm="l2", wd_in_ratio=True, max_ratio=None)
    return Optimizer(params, [*_adam_moments(), *paper], lr=lr, mom=mom, sqr_mom=sqr_mom,
                     eps=eps, wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def AdamGC(params, lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-8, wd=0.0, predicate=conv_weight,
           impl="auto", master_weights=True):
    """Adam with gradient centralisation (Yong et al., 2020, arXiv:2004.01461), the notebook's
    `Adam_GCC`: for the tensors `predicate` accepts (convolution weights by default)
    `g <- g - mean(g)` per output channel, then Adam,
    `p <- p - lr * m_hat / (sqrt(v_hat) + eps)`.  Any chain can start with `centralize_grad`."""
    cbs = [partial(centralize_grad, predicate=predicate), weight_decay, *_adam_moments(),
           adam_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def StableAdam(params, lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-8, wd=0.0,
               predicate=conv_not_cinEq256_coutLt256, impl="auto", master_weights=True):
    """StableAdam (the notebook's): Adam whose step, for each output channel `k` of the tensors
    `predicate` accepts (weights followed by a batch norm), grows with the channel's RMS, so the
    effective learning rate of scale-invariant weights stays stable:
    `p^k <- p^k - lr * (rms(p^k_t) / rms(p^k_0)) * m_hat^k / (sqrt(v_hat^k) + eps)`
    (ratio 1 where either RMS is 0; with `wd`, measured after the decay)."""
    cbs = [partial(record_channel_rms, predicate=predicate), weight_decay, *_adam_moments(),
           stable_adam_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def AdamAWD(params, lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-8, predicate=conv_not_cinEq256_coutLt256,
            impl="auto", master_weights=True):
    """AdamAWD (the notebook's), Adam with adaptive weight decay: after Adam's step
    `p <- p - lr * m_hat / (sqrt(v_hat) + eps)`, each output channel `k` of the tensors
    `predicate` accepts is brought back to its RMS at the first step,
    `p^k <- p^k * rms(p^k_0) / rms(p^k)` (unchanged where either is 0)."""
    cbs = [partial(record_channel_rms, predicate=predicate), *_adam_moments(), adam_step,
           restore_channel_rms]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, impl=impl,
                     master_weights=master_weights)


@torch_names
def UM(params, lr=1e-3, mom=0.9, wd=0.0, norm="rms", impl="auto", master_weights=True):
    """UM, unit momentum (the notebook's): `p <- p - lr * m / |m|` per tensor, `|.|` the RMS
    (`norm="rms"`, what the notebook ran) or the L2 norm (`norm="l2"`, its formula); no step where
    `m = 0`.  The bias correction of `m` cancels in the ratio, so no step count is kept."""
    cbs = [weight_decay, ema_grad, partial(unit_momentum_step, norm=norm)]
    return Optimizer(params, cbs, lr=lr, mom=mom, wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def PreLAMB(params, lr=1e-3, mom=0.9, wd=0.0, impl="auto", master_weights=True):
    """PreLAMB (the notebook's): LAMB's layer-wise scaling moved onto the gradient, without a
    second moment: `g_hat = g * |p| / |g|` per tensor (1 where either norm is 0), `m` its moving
    average, `p <- p - lr * m_hat - lr * wd * p` (the notebook's `lambda * p`, `lambda = lr * wd`)."""
    cbs = [scale_grad_to_param, ema_grad, step_stat, weight_decay, debiased_momentum_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def DuvAdam(params, lr=1e-3, mom=0.9, sqr_mom=0.999, wd=0.0, impl="auto", master_weights=True):
    """DuvAdam, debiased and unscaled variance Adam (the notebook's): the second moment averages
    the gradient's relative deviation from the momentum, `r_t = g_t / m_{t-1}` (1 where
    `m_{t-1} = 0`), `d_t = sqr_mom d_{t-1} + (1 - sqr_mom)(r_t - 1)**2`,
    `p <- p - lr * m_hat / (1 + sqrt(d_hat))`, `d_hat = d_t / (1 - sqr_mom**t)`."""
    cbs = [average_deviation, ema_grad, step_stat, weight_decay, deviation_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def SUAdam(params, lr=1e-3, mom=0.9, sqr_mom=0.99, wd=0.0, impl="auto", master_weights=True):
    """SUAdam, scale-adaptive unit-gradient Adam (the notebook's): on the gradient's sign
    `s_t = sign(g_t)`, `r_t = s_t / m_{t-1}` (1 where `m_{t-1} = 0`), `m` the moving average of
    `s`, `d_t = sqr_mom d_{t-1} + (1 - sqr_mom)|r_t - 1|`, and a step proportional to the layer's
    mean magnitude `e_t = mean(|p_t|)` (1 for an all-zero tensor):
    `p <- p - lr * e_t * m_hat / (1 + d_hat)`."""
    cbs = [mean_abs_param, sign_grad, partial(average_deviation, square=False), ema_grad,
           step_stat, weight_decay, partial(deviation_step, root=False)]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def BAdam(params, lr=1e-3, mom=0.9, sqr_mom=0.99, smooth=50.0, wd=0.0, secant="softplus", impl="auto",
          master_weights=True):
    """BAdam, binomial Adam (the notebook's): a diagonal secant curvature replaces Adam's second
    moment.  With `s_{t-1}` the last step and `e_t = mean(|p_t|)` (1 for an all-zero tensor):
    `phi_t = (g_t - g_{t-1}) / softplus(s_{t-1}, smooth)` (the algorithm cell; `secant="sign_clamp"`
    divides by `sign_clamp(s_{t-1}, mean|s_{t-1}|)` as the notebook's code did, which diverges on
    noisy gradients), `c_t = sqr_mom c_{t-1} + (1 - sqr_mom) phi_t`,
    `c_hat = c_t / (1 - sqr_mom**(t-1))`,
    `s_t = lr * e_t * m_hat / softplus(|c_hat|, smooth)` (`s_1 = lr * e_1 * m_hat`), `p <- p - s_t`."""
    check_secant(secant)  # now, not at the first step
    cbs = [mean_abs_param, ema_grad, step_stat, weight_decay, partial(badam_step, secant=secant)]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, smooth=smooth, wd=wd,
                     impl=impl, master_weights=master_weights)


# ---- adding blocks to any optimizer ------------------------------------------------------------

def with_blocks(opt: Optimizer, before=(), after=()) -> Optimizer:
    """A new optcraft `Optimizer` over `opt`'s parameter groups (hyperparameters included), state,
    `impl` and `master_weights`, running `[*before, *opt.cbs, *after]`: gradient centralisation or
    update recording for a named recipe, `with_blocks(Lamb(...), before=[centralize_grad])`.  An
    optimizer on the fused path moves to "auto" (the longer chain has no torch kernel)."""
    if not isinstance(opt, Optimizer):
        raise TypeError(f"with_blocks takes an optcraft Optimizer (for Lookahead, give it the "
                        f"optimizer it wraps), got {type(opt).__name__}")
    cbs = [*before, *opt.cbs, *after]
    impl = "auto" if opt.impl == "fused" else opt.impl
    resolve(impl, Chain(cbs))
    new = Optimizer([dict(g) for g in opt.param_groups], cbs, impl=impl,
                    master_weights=opt.master_weights)
    for p, st in opt.state.items():
        new.state[p] = dict(st)
    return new


def record_updates(opt_or_cbs):
    """Keep each parameter's last update, `theta_t - theta_{t+1}`, in `state[p]['update']` (the
    notebook's diagnostic), for any chain or optcraft optimizer: a list of callbacks gives
    `[keep_param, *cbs, last_update]`, an `Optimizer` gives `with_blocks(opt, [keep_param],
    [last_update])`."""
    if isinstance(opt_or_cbs, torch.optim.Optimizer):
        return with_blocks(opt_or_cbs, before=[keep_param], after=[last_update])
    return [keep_param, *opt_or_cbs, last_update]
