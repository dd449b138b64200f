"""torch.optim's elementwise family as named optimizers: Adagrad, Adadelta, Adamax, NAdam, ASGD
and Rprop, each a short chain of blocks giving torch.optim's numbers for the same arguments.

Each recipe takes torch's keyword names and defaults (`lr` included) and fastai's names where
they exist (`mom`, `sqr_mom`, `wd` for `betas`, `momentum`, `weight_decay`), `impl` (see
`optcraft.engine`; Adagrad also runs as torch's fused kernel) and `master_weights` (see
`optcraft.precision`).  torch's weight decay is L2 (added to the gradient), as here; NAdam's
`decoupled_weight_decay=True` decays the weights directly.  torch's `maximize`, `foreach`,
`capturable`, `differentiable` and `fused` arguments are not taken (`impl` chooses how a chain
runs).  State is created at a parameter's first step with a gradient (torch creates Adagrad's
accumulator when the optimizer is built: the same numbers unless `initial_accumulator_value` is
changed in between).
"""
from __future__ import annotations

from functools import partial

from ..blocks import average_grad, average_sqr_grad, l2_reg, step_stat, weight_decay
from ..blocks.elementwise import (adadelta_step, adagrad_step, adamax_step, adamax_update,
                                  asgd_rates, asgd_step, cautious, max_abs_grad, nadam_mu,
                                  nadam_step, nadam_update, rprop_step, sum_sqr_grad,
                                  update_step)
from ..hypers import torch_names
from ..optimizer import Optimizer

__all__ = ["Adagrad", "Adadelta", "Adamax", "NAdam", "ASGD", "Rprop"]


def _stepped(direction, step, masked: bool) -> list:
    """The step block, or with Cautious masking (Liang et al., 2024) the direction block, the
    mask and `update_step`.  (Adagrad, Adadelta, ASGD and Rprop take no `cautious`: without
    momentum their direction always agrees in sign with the gradient, so the mask would keep
    everything.)"""
    return [direction, cautious, update_step] if masked else [step]


@torch_names
def Adagrad(params, lr=1e-2, lr_decay=0.0, wd=0.0, initial_accumulator_value=0.0, eps=1e-10,
            impl="auto", master_weights=True):
    """Adagrad (Duchi et al., 2011, JMLR 12), torch.optim's `Adagrad`:
    `g <- g + wd * p`, `sqr_avg <- sqr_avg + g**2` (from `initial_accumulator_value`),
    `p <- p - lr / (1 + (step - 1) * lr_decay) * g / (sqrt(sqr_avg) + eps)`.

    Defaults: lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10.
    `impl="auto"` runs it as torch's fused kernel (`torch._fused_adagrad_`)."""
    cbs = [l2_reg, sum_sqr_grad, step_stat, adagrad_step]
    return Optimizer(params, cbs, lr=lr, lr_decay=lr_decay, wd=wd,
                     initial_accumulator_value=initial_accumulator_value, eps=eps, impl=impl,
                     master_weights=master_weights)


@torch_names
def Adadelta(params, lr=1.0, rho=0.9, eps=1e-6, wd=0.0, impl="auto", master_weights=True):
    """Adadelta (Zeiler, 2012, arXiv:1212.5701), torch.optim's `Adadelta`:
    `g <- g + wd * p`, `sqr_avg <- rho * sqr_avg + (1 - rho) * g**2`,
    `d = sqrt(delta_avg + eps) / sqrt(sqr_avg + eps) * g`,
    `delta_avg <- rho * delta_avg + (1 - rho) * d**2`, `p <- p - lr * d`.

    Defaults: lr=1.0, rho=0.9, eps=1e-6, weight_decay=0."""
    cbs = [l2_reg, adadelta_step]
    return Optimizer(params, cbs, lr=lr, rho=rho, eps=eps, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def Adamax(params, lr=2e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0, cautious=False,
           impl="auto", master_weights=True):
    """Adamax (Kingma & Ba, 2015, arXiv:1412.6980, section 7.1), torch.optim's `Adamax`:
    `g <- g + wd * p`, `grad_avg <- mom * grad_avg + (1 - mom) * g`,
    `grad_inf <- max(sqr_mom * grad_inf, |g| + eps)`,
    `p <- p - lr / (1 - mom**step) * grad_avg / grad_inf`.

    Defaults: lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.  `cautious=True`: the
    direction `grad_avg / grad_inf / (1 - mom**step)` masked as Cautious optimizers do (see
    `optcraft.optimizers.modern`)."""
    cbs = [l2_reg, partial(average_grad, dampening=True), max_abs_grad, step_stat,
           *_stepped(adamax_update, adamax_step, cautious)]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def NAdam(params, lr=2e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0, momentum_decay=4e-3,
          decoupled_weight_decay=False, cautious=False, impl="auto", master_weights=True):
    """NAdam (Dozat, 2016, "Incorporating Nesterov Momentum into Adam"), torch.optim's `NAdam`:
    decay (`g <- g + wd * p`, or `p <- p * (1 - lr * wd)` with `decoupled_weight_decay=True`),
    Adam's averages, `mu_t = mom * (1 - 0.5 * 0.96**(t * momentum_decay))`,
    `mu_product <- mu_product * mu_t`, `denom = sqrt(sqr_avg / (1 - sqr_mom**t)) + eps`,
    `p <- p - lr (1 - mu_t) / (1 - mu_product) g / denom
            - lr mu_{t+1} / (1 - mu_product mu_{t+1}) grad_avg / denom`.

    Defaults: lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
    decoupled_weight_decay=False.  `cautious=True`: NAdam's direction (both terms) masked as
    Cautious optimizers do (see `optcraft.optimizers.modern`)."""
    cbs = [weight_decay if decoupled_weight_decay else l2_reg,
           partial(average_grad, dampening=True), average_sqr_grad, step_stat, nadam_mu,
           *_stepped(nadam_update, nadam_step, cautious)]
    return Optimizer(params, cbs, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd,
                     momentum_decay=momentum_decay, impl=impl, master_weights=master_weights)


@torch_names
def ASGD(params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, wd=0.0, impl="auto",
         master_weights=True):
    """Averaged SGD (Polyak & Juditsky, 1992, "Acceleration of Stochastic Approximation by
    Averaging"), torch.optim's `ASGD`: `g <- g + wd * p`,
    `p <- p * (1 - lambd * eta) - eta * g`, `ax <- ax + mu * (p - ax)`, then
    `eta <- lr / (1 + lambd * lr * step)**alpha`, `mu <- 1 / max(1, step - t0)` for the next
    step (eta starts at lr, mu at 1).  The average is the state `ax`.

    Defaults: lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0."""
    cbs = [l2_reg, step_stat, asgd_rates, asgd_step]
    return Optimizer(params, cbs, lr=lr, lambd=lambd, alpha=alpha, t0=t0, wd=wd, impl=impl,
                     master_weights=master_weights)


@torch_names
def Rprop(params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), impl="auto",
          master_weights=True):
    """Rprop (Riedmiller & Braun, 1993, "A Direct Adaptive Method for Faster Backpropagation
    Learning: The RPROP Algorithm"), torch.optim's `Rprop`: per element, the step size (starting
    at lr) is multiplied by `etas[1]` where the gradient kept its sign and by `etas[0]` where it
    flipped (that gradient then counts as 0), clamped to `step_sizes`;
    `p <- p - sign(g) * step_size`.

    Defaults: lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50).  They are kept as the
    hyperparameters `eta_minus`, `eta_plus`, `step_size_min`, `step_size_max`."""
    (eta_minus, eta_plus), (step_size_min, step_size_max) = etas, step_sizes
    return Optimizer(params, [rprop_step], lr=lr, eta_minus=eta_minus, eta_plus=eta_plus,
                     step_size_min=step_size_min, step_size_max=step_size_max, impl=impl,
                     master_weights=master_weights)
