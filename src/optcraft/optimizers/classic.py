"""The named optimizers of fastai's optimizer module (seed 001): each a chain of blocks.

Every recipe takes fastai's names (`mom`, `sqr_mom`, `wd`) and torch's (`momentum`, `betas`,
`weight_decay`), `impl` (see `optcraft.engine`) and `master_weights` (see `optcraft.precision`).  `decouple_wd=True`
decays the weights directly (AdamW-style); `False` adds `wd * p` to the gradient (L2
regularisation).  Like torch.optim's, every recipe can be built without `lr`: torch's default
for the algorithms torch has (SGD and Adam 1e-3, RMSprop 1e-2, RAdam 1e-3), the Adam family's
1e-3 for the others (QHAdam's paper, LAMB's, Ranger's; LARC's SGD 1e-3).  `AdamW` and `RMSprop`
are torch's spellings of `Adam` (weight decay decoupled by default) and `RMSProp`.  Momentum
(`mom`) is a hyperparameter like any other: given per group, changed
later or cycled by a scheduler, it takes effect (its buffer is made when it first is not 0).
"""
from __future__ import annotations

from functools import partial

from ..blocks import (adam_step, average_grad, average_sqr_grad, l2_reg, lamb_blocks,
                      larc_layer_lr, larc_step, momentum_step, qhadam_step, radam_step,
                      rms_prop_step, step_stat, weight_decay)
from ..blocks.elementwise import adam_update, cautious as cautious_mask, update_step
from ..hypers import torch_names
from ..optimizer import Optimizer
from ..wrappers import Lookahead


def decay(decouple_wd: bool):
    return weight_decay if decouple_wd else l2_reg


@torch_names
def SGD(params, lr=1e-3, mom=0.0, wd=0.0, decouple_wd=True, impl="auto", master_weights=True):
    """SGD, with momentum while `mom > 0`: `grad_avg <- mom * grad_avg + g`,
    `p <- p - lr * grad_avg` (torch's SGD without dampening)."""
    cbs = [decay(decouple_wd), average_grad, momentum_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def RMSProp(params, lr=1e-2, sqr_mom=0.99, mom=0.0, wd=0.0, decouple_wd=True, impl="auto", master_weights=True):
    """RMSProp (Hinton, 2012): `p <- p - lr * d / (sqrt(sqr_avg) + eps)`, d the gradient or, while
    `mom > 0`, its momentum `grad_avg <- mom * grad_avg + g` (fastai's: on the raw gradient);
    `sqr_mom` is the course's alpha."""
    cbs = [decay(decouple_wd), average_grad, average_sqr_grad, rms_prop_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def Adam(params, lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01, decouple_wd=True, impl="auto",
         master_weights=True, cautious=False):
    """Adam (Kingma & Ba, 2015), AdamW with `decouple_wd=True` (Loshchilov & Hutter, 2019).
    `cautious=True`: Cautious Adam (Liang et al., 2024, arXiv:2411.16085), Adam's direction
    `u = m_hat / (sqrt(v_hat) + eps)` masked per tensor where it disagrees in sign with the
    gradient and rescaled by `numel / (kept + 1)` (see `blocks.elementwise.cautious`)."""
    steps = [adam_update, cautious_mask, update_step] if cautious else [adam_step]
    cbs = [decay(decouple_wd), partial(average_grad, dampening=True), average_sqr_grad,
           step_stat, *steps]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def RAdam(params, lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.0, beta=0.0, decouple_wd=True,
          impl="auto", master_weights=True):
    """Rectified Adam (Liu et al., 2020); SAdam's softplus denominator with `beta > 0`."""
    cbs = [decay(decouple_wd), partial(average_grad, dampening=True), average_sqr_grad,
           step_stat, radam_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, beta=beta,
                     impl=impl, master_weights=master_weights)


@torch_names
def QHAdam(params, lr=1e-3, mom=0.999, sqr_mom=0.999, nu_1=0.7, nu_2=1.0, eps=1e-8, wd=0.0,
           decouple_wd=True, impl="auto", master_weights=True):
    """Quasi-hyperbolic Adam (Ma & Yarats, 2019): Adam when nu_1 = nu_2 = 1."""
    cbs = [decay(decouple_wd), partial(average_grad, dampening=True),
           partial(average_sqr_grad, dampening=True), step_stat, qhadam_step]
    return Optimizer(params, cbs, lr=lr, nu_1=nu_1, nu_2=nu_2, mom=mom, sqr_mom=sqr_mom, eps=eps,
                     wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def Larc(params, lr=1e-3, mom=0.9, clip=True, trust_coeff=0.02, eps=1e-8, wd=0.0, decouple_wd=True,
         impl="auto", master_weights=True):
    """LARC (`clip=True`) or LARS (`clip=False`) (You et al., 2017): SGD with momentum at a
    per-layer learning rate `lr * trust_coeff * |p| / (|g| + wd |p| + eps)`."""
    cbs = [decay(decouple_wd), average_grad, partial(larc_layer_lr, clip=clip), larc_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, trust_coeff=trust_coeff, eps=eps, wd=wd,
                     impl=impl, master_weights=master_weights)


@torch_names
def Lamb(params, lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.0, decouple_wd=True, impl="auto", master_weights=True):
    """LAMB (You et al., 2020), fastai's form: Adam's update scaled per layer by
    min(rms(p) / rms(update), 10)."""
    cbs = [decay(decouple_wd), partial(average_grad, dampening=True), average_sqr_grad,
           step_stat, *lamb_blocks()]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, impl=impl, master_weights=master_weights)


@torch_names
def ranger(params, lr=1e-3, mom=0.95, wd=0.01, eps=1e-6, sqr_mom=0.99, beta=0.0, decouple_wd=True,
           k=6, alpha=0.5, impl="auto", master_weights=True):
    """Ranger (Wright, 2019): `Lookahead(RAdam(...), k, alpha)`."""
    return Lookahead(RAdam(params, lr=lr, mom=mom, wd=wd, eps=eps, sqr_mom=sqr_mom, beta=beta,
                           decouple_wd=decouple_wd, impl=impl, master_weights=master_weights), k=k, alpha=alpha)


#: torch's spellings: the same optimizers (`Adam` decouples its weight decay by default, AdamW).
AdamW = Adam
RMSprop = RMSProp
