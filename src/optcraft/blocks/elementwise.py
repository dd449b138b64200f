"""Blocks of the elementwise optimizers people train with today: torch.optim's family (Adagrad,
Adadelta, Adamax, NAdam, ASGD, Rprop) and the modern ones (Lion, ADOPT, Adan, MARS, Cautious).

The recipes that chain them are in `optcraft.optimizers.torch_family` and
`optcraft.optimizers.modern`; docs/modern-elementwise.md lists each update rule and the reference
it is tested against.

Cautious masking works on an *update direction* handed from block to block: a block ending in
`_update` hands on the transient `update` (the direction before the learning rate), `cautious`
masks it, and `update_step` moves the parameters by `-lr * update`.
"""
from __future__ import annotations

from ..tensorlist import where
from .base import block, is_zero, like_param, number, transient
from .steps import debias


# ---- the update direction, masked or not, and the step along it ------------------------------

@block(state=dict(update=transient), reads="elements")
def update_step(p, lr, update=None, **kwargs):
    """`p <- p - lr * update`, the direction a block before it handed on (nothing where it
    handed none: ADOPT's first step)."""
    if update is not None:
        p.add_(update, alpha=-lr)


@block(state=dict(update=transient), reads="tensor")
def cautious(p, update=None, **kwargs):
    """Cautious masking (Liang et al., 2024, "Cautious Optimizers: Improving Training with One
    Line of Code", arXiv:2411.16085), per tensor, on the update direction `u` a block before it
    handed on:

    `mask = (u * g > 0)`, `u <- u * mask * (numel / (sum(mask) + 1))`

    (the authors' rescaling), `g` the gradient as the chain has it at this point (MARS's corrected
    gradient).  Put it between a block that hands on `update` and `update_step`."""
    if update is None:
        return None
    mask = (update.mul(p.grad) > 0).to(dtype=update.tensors[0].dtype)
    scale = mask.map(lambda m: m.numel() / (m.sum() + 1))
    return {"update": update.mul(mask).mul_(scale)}


@block(hypers=dict(wd=0.0), switches=("wd",), reads="elements")
def prox_decay(p, lr, wd, do_wd=True, **kwargs):
    """Weight decay as a proximal step, after the update: `p <- p / (1 + lr * wd)` (Adan's
    "decay as division"; skipped where the state says `do_wd=False`)."""
    if do_wd and not is_zero(wd):
        p.div_(1 + lr * wd)


# ---- Adam's and Lion's directions --------------------------------------------------------------

@block(hypers=dict(eps=1e-5), state=dict(update=transient), reads="tensor")
def adam_update(p, mom, sqr_mom, step, grad_avg, sqr_avg, eps, **kwargs):
    """Adam's direction (Kingma & Ba, 2015), handed on as `update`:
    `u = (grad_avg / debias1) / (sqrt(sqr_avg / debias2) + eps)` (`adam_step` without the
    step)."""
    debias1 = debias(mom, 1 - mom, step)
    debias2 = debias(sqr_mom, 1 - sqr_mom, step)
    denom = sqr_avg.div(debias2).sqrt_().add_(eps)
    return {"update": grad_avg.div(denom).div_(debias1)}


@block(hypers=dict(mom=0.9, sqr_mom=0.99), state=dict(grad_avg=like_param, update=transient),
       reads="tensor")
def lion_update(p, mom, sqr_mom, grad_avg=None, **kwargs):
    """Lion's direction (Chen et al., 2023, arXiv:2302.06675), handed on as `update`:
    `u = sign(mom * grad_avg + (1 - mom) * g)`, then
    `grad_avg <- sqr_mom * grad_avg + (1 - sqr_mom) * g` (`lion_step` without the step)."""
    if grad_avg is None:
        grad_avg = p.grad.zeros_like()
    update = grad_avg.lerp(p.grad, 1 - mom).sign()
    grad_avg.lerp_(p.grad, 1 - sqr_mom)
    return {"grad_avg": grad_avg, "update": update}


# ---- ADOPT -------------------------------------------------------------------------------------

def adopt_clip(step):
    """ADOPT's default clipping schedule: `step ** 0.25` (the `torch-adopt` package's
    `clip_lambda`), `step` counting the updates before this one."""
    return step ** 0.25


@block(hypers=dict(mom=0.9, sqr_mom=0.9999, eps=1e-6, wd=0.0),
       state=dict(grad_avg=like_param, sqr_avg=like_param, update=transient),
       static=("decouple_wd",), switches=("wd",), reads="tensor")
def adopt_update(p, lr, mom, sqr_mom, eps, step, wd=0.0, grad_avg=None, sqr_avg=None,
                 clip_lambda=adopt_clip, decouple_wd=False, do_wd=True, **kwargs):
    """ADOPT (Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the
    Optimal Rate", arXiv:2411.02853), as the `torch-adopt` package computes it.

    First step of a parameter: `sqr_avg <- g**2` and nothing else (no update, no decay).  Then,
    with `k = step - 1` the updates before this one:
    `p <- p * (1 - lr * wd)` if `decouple_wd` (else the chain adds `wd * p` to g before),
    `n = clamp(g / max(sqrt(sqr_avg), eps), -c, c)` with `c = clip_lambda(k)` (no clamp when
    `clip_lambda` is None), `grad_avg <- mom * grad_avg + (1 - mom) * n`, handed on as `update`;
    then `sqr_avg <- sqr_mom * sqr_avg + (1 - sqr_mom) * g**2` (the current gradient enters the
    second moment after it normalised this step: ADOPT's change to Adam)."""
    g = p.grad
    if sqr_avg is None:
        return {"sqr_avg": g.mul(g), "grad_avg": g.zeros_like()}
    if decouple_wd and do_wd and not is_zero(wd):
        p.mul_(1 - lr * wd)
    normed = g.div(sqr_avg.sqrt().clamp_min_(eps))
    if clip_lambda is not None:
        clip = clip_lambda(step - 1)
        normed.clamp_min_(-clip).clamp_max_(clip)
    grad_avg.lerp_(normed, 1 - mom)
    sqr_avg.mul_(sqr_mom).addcmul_(g, g, value=1 - sqr_mom)
    return {"grad_avg": grad_avg, "sqr_avg": sqr_avg, "update": grad_avg}


# ---- Adan --------------------------------------------------------------------------------------

@block(hypers=dict(mom=0.98, diff_mom=0.92, sqr_mom=0.99, eps=1e-8),
       state=dict(grad_avg=like_param, diff_avg=like_param, sqr_avg=like_param,
                  prev_grad=like_param, update=transient),
       static=("first_step_moments",), reads="tensor")
def adan_update(p, mom, diff_mom, sqr_mom, eps, step, grad_avg=None, diff_avg=None,
                sqr_avg=None, prev_grad=None, first_step_moments=True, **kwargs):
    """Adan's direction (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models", arXiv:2208.06677), as the authors' code (sail-sg/Adan) computes it,
    handed on as `update`.  `mom`, `diff_mom`, `sqr_mom` are decays (the authors' betas,
    0.98, 0.92, 0.99; the `adan-pytorch` package's betas are one minus these):

    `d = g - prev_grad` (0 at a parameter's first step), `prev_grad <- g`,
    `grad_avg <- mom * grad_avg + (1 - mom) * g`,
    `diff_avg <- diff_mom * diff_avg + (1 - diff_mom) * d`,
    `sqr_avg <- sqr_mom * sqr_avg + (1 - sqr_mom) * (g + diff_mom * d)**2`,
    `u = (grad_avg / debias1 + diff_mom * diff_avg / debias2) / (sqrt(sqr_avg / debias3) + eps)`.

    `first_step_moments=False` is the `adan-pytorch` package's behaviour: the moments are not
    updated at a parameter's first step (they stay 0, so that step's update is 0), although the
    step count and the bias corrections count it."""
    g = p.grad
    if grad_avg is None:
        grad_avg, diff_avg, sqr_avg = g.zeros_like(), g.zeros_like(), g.zeros_like()
    if prev_grad is None:
        diff, prev_grad = g.zeros_like(), g.clone()
        moments = first_step_moments
    else:
        diff = g.sub(prev_grad)
        prev_grad.copy_(g)
        moments = True
    if moments:
        grad_avg.lerp_(g, 1 - mom)
        diff_avg.lerp_(diff, 1 - diff_mom)
        nesterov = g.add(diff, alpha=diff_mom)
        sqr_avg.mul_(sqr_mom).addcmul_(nesterov, nesterov, value=1 - sqr_mom)
    denom = sqr_avg.div(debias(sqr_mom, 1 - sqr_mom, step)).sqrt_().add_(eps)
    numer = grad_avg.div(debias(mom, 1 - mom, step))
    numer.add_(diff_avg, alpha=diff_mom / debias(diff_mom, 1 - diff_mom, step))
    return {"grad_avg": grad_avg, "diff_avg": diff_avg, "sqr_avg": sqr_avg,
            "prev_grad": prev_grad, "update": numer.div_(denom)}


# ---- MARS --------------------------------------------------------------------------------------

@block(hypers=dict(gamma=0.025, mom=0.95), state=dict(prev_grad=like_param))
def mars_correction(p, gamma, mom, prev_grad=None, **kwargs):
    """MARS's variance-reduced gradient (Yuan et al., 2024, "MARS: Unleashing the Power of
    Variance Reduction for Training Large Models", arXiv:2411.10438, its approximate form):

    `c = g + gamma * mom / (1 - mom) * (g - prev_grad)`, `c <- c / max(|c|, 1)` per tensor (L2
    norm), `prev_grad <- g`; the blocks after it see `c` as the gradient.  At a parameter's first
    step the correction is 0 (`x_1 = x_0` in the paper's algorithm; the authors' code takes a
    zero previous gradient instead, see docs/modern-elementwise.md)."""
    g = p.grad
    if prev_grad is None:
        c, prev_grad = g.clone(), g.clone()
    else:
        c = g.sub(prev_grad).mul_(gamma * mom / (1 - mom)).add_(g)
        prev_grad.copy_(g)
    p.grad = c.div_(c.norm().clamp_min(1.0))
    return {"prev_grad": prev_grad}


# ---- torch.optim's family ------------------------------------------------------------------------

@block(hypers=dict(initial_accumulator_value=0.0), state=dict(sqr_avg=like_param),
       reads="elements")
def sum_sqr_grad(p, initial_accumulator_value=0.0, sqr_avg=None, **kwargs):
    """Adagrad's accumulator: `sqr_avg <- sqr_avg + g**2`, starting at
    `initial_accumulator_value`."""
    if sqr_avg is None:
        sqr_avg = p.grad.zeros_like().add_(initial_accumulator_value)
    sqr_avg.addcmul_(p.grad, p.grad)
    return {"sqr_avg": sqr_avg}


@block(hypers=dict(lr_decay=0.0, eps=1e-10), reads="elements")
def adagrad_step(p, lr, lr_decay, eps, step, sqr_avg, **kwargs):
    """Adagrad (Duchi et al., 2011, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 12): `p <- p - lr_t * g / (sqrt(sqr_avg) + eps)` with
    `lr_t = lr / (1 + (step - 1) * lr_decay)` (torch.optim's form)."""
    denom = sqr_avg.sqrt().add_(eps)
    p.addcdiv_(p.grad, denom, value=-lr / (1 + (step - 1) * lr_decay))


@block(hypers=dict(rho=0.9, eps=1e-6), state=dict(sqr_avg=like_param, delta_avg=like_param),
       reads="elements")
def adadelta_step(p, lr, rho, eps, sqr_avg=None, delta_avg=None, **kwargs):
    """Adadelta (Zeiler, 2012, arXiv:1212.5701), torch.optim's form, `rho` the decay of both
    averages (torch's name; it is not Adam's `sqr_mom`, so a torch param group's `rho` reaches
    it): `sqr_avg <- rho * sqr_avg + (1 - rho) * g**2`,
    `d = sqrt(delta_avg + eps) / sqrt(sqr_avg + eps) * g`,
    `delta_avg <- rho * delta_avg + (1 - rho) * d**2`, `p <- p - lr * d`."""
    if sqr_avg is None:
        sqr_avg, delta_avg = p.grad.zeros_like(), p.grad.zeros_like()
    sqr_avg.mul_(rho).addcmul_(p.grad, p.grad, value=1 - rho)
    delta = delta_avg.add(eps).sqrt_().div_(sqr_avg.add(eps).sqrt_()).mul_(p.grad)
    delta_avg.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    p.add_(delta, alpha=-lr)
    return {"sqr_avg": sqr_avg, "delta_avg": delta_avg}


@block(hypers=dict(sqr_mom=0.999, eps=1e-8), state=dict(grad_inf=like_param), reads="elements")
def max_abs_grad(p, sqr_mom, eps, grad_inf=None, **kwargs):
    """Adamax's infinity norm: `grad_inf <- max(sqr_mom * grad_inf, |g| + eps)`."""
    if grad_inf is None:
        grad_inf = p.grad.zeros_like()
    grad_inf.mul_(sqr_mom).maximum_(p.grad.abs().add_(eps))
    return {"grad_inf": grad_inf}


@block(reads="elements")
def adamax_step(p, lr, mom, step, grad_avg, grad_inf, **kwargs):
    """Adamax (Kingma & Ba, 2015, section 7.1): `p <- p - lr / debias1 * grad_avg / grad_inf`."""
    p.addcdiv_(grad_avg, grad_inf, value=-lr / debias(mom, 1 - mom, step))


@block(state=dict(update=transient), reads="tensor")
def adamax_update(p, mom, step, grad_avg, grad_inf, **kwargs):
    """Adamax's direction, handed on as `update` (for `cautious`):
    `u = grad_avg / grad_inf / (1 - mom**step)`."""
    return {"update": grad_avg.div(grad_inf).div_(debias(mom, 1 - mom, step))}


@block(hypers=dict(momentum_decay=4e-3), state=dict(mu_product=number, mu=transient,
                                                    mu_next=transient), reads="numbers")
def nadam_mu(p, mom, momentum_decay, step, mu_product=1.0, **kwargs):
    """NAdam's momentum schedule (Dozat, 2016, "Incorporating Nesterov Momentum into Adam"),
    torch.optim's form, on numbers: `mu_t = mom * (1 - 0.5 * 0.96**(step * momentum_decay))`,
    `mu_product <- mu_product * mu_t`; hands on `mu` and `mu_next` (`mu_{t+1}`)."""
    mu = mom * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = mom * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    return {"mu_product": mu_product * mu, "mu": mu, "mu_next": mu_next}


@block(hypers=dict(eps=1e-8), reads="elements")
def nadam_step(p, lr, sqr_mom, step, grad_avg, sqr_avg, eps, mu, mu_next, mu_product, **kwargs):
    """NAdam's step (torch.optim's form), after `nadam_mu`: with
    `denom = sqrt(sqr_avg / debias2) + eps`,
    `p <- p - lr * (1 - mu) / (1 - mu_product) * g / denom
            - lr * mu_next / (1 - mu_product * mu_next) * grad_avg / denom`."""
    denom = sqr_avg.div(debias(sqr_mom, 1 - sqr_mom, step)).sqrt_().add_(eps)
    p.addcdiv_(p.grad, denom, value=-lr * (1 - mu) / (1 - mu_product))
    p.addcdiv_(grad_avg, denom, value=-lr * mu_next / (1 - mu_product * mu_next))


@block(hypers=dict(eps=1e-8), state=dict(update=transient), reads="tensor")
def nadam_update(p, sqr_mom, step, grad_avg, sqr_avg, eps, mu, mu_next, mu_product, **kwargs):
    """NAdam's direction, handed on as `update` (for `cautious`): with
    `denom = sqrt(sqr_avg / debias2) + eps`,
    `u = ((1 - mu) / (1 - mu_product) * g + mu_next / (1 - mu_product * mu_next) * grad_avg)
    / denom`."""
    denom = sqr_avg.div(debias(sqr_mom, 1 - sqr_mom, step)).sqrt_().add_(eps)
    update = p.grad.mul((1 - mu) / (1 - mu_product))
    update.add_(grad_avg, alpha=mu_next / (1 - mu_product * mu_next))
    return {"update": update.div_(denom)}


@block(hypers=dict(lambd=1e-4, alpha=0.75, t0=1e6),
       state=dict(eta=number, mu=number, eta_now=transient, mu_now=transient), reads="numbers")
def asgd_rates(p, lr, lambd, alpha, t0, step, eta=None, mu=None, **kwargs):
    """ASGD's schedules (Polyak & Juditsky, 1992; torch.optim's form), on numbers: hands on the
    rates of this step (`eta_now`, `lr` at a parameter's first step; `mu_now`, 1 then) and keeps
    those of the next, `eta = lr / (1 + lambd * lr * step)**alpha` and
    `mu = 1 / max(1, step - t0)`."""
    return {"eta_now": lr if eta is None else eta, "mu_now": 1.0 if mu is None else mu,
            "eta": lr / ((1 + lambd * lr * step) ** alpha), "mu": 1 / max(1, step - t0)}


@block(state=dict(ax=like_param), reads="elements")
def asgd_step(p, lambd, eta_now, mu_now, ax=None, **kwargs):
    """Averaged SGD (torch.optim's ASGD): `p <- p * (1 - lambd * eta) - eta * g`, then the
    average `ax <- ax + mu * (p - ax)`."""
    p.mul_(1 - lambd * eta_now).add_(p.grad, alpha=-eta_now)
    if ax is None:
        ax = p.zeros_like()
    ax.lerp_(p, mu_now)
    return {"ax": ax}


@block(hypers=dict(eta_minus=0.5, eta_plus=1.2, step_size_min=1e-6, step_size_max=50.0),
       state=dict(prev_grad=like_param, step_size=like_param), reads="elements")
def rprop_step(p, lr, eta_minus, eta_plus, step_size_min, step_size_max, prev_grad=None,
               step_size=None, **kwargs):
    """Rprop (Riedmiller & Braun, 1993; torch.optim's form): per element, the step size grows by
    `eta_plus` where the gradient kept its sign, shrinks by `eta_minus` where it changed (and that
    element's gradient is taken as 0 for this step and the next), within
    `[step_size_min, step_size_max]`; `p <- p - sign(g) * step_size`.  The step sizes start at
    `lr`."""
    g = p.grad
    if prev_grad is None:
        prev_grad, step_size = g.zeros_like(), g.zeros_like().add_(lr)
    factor = g.mul(prev_grad).sign()
    factor = where(factor > 0, eta_plus, factor)
    factor = where(factor < 0, eta_minus, factor)
    factor = where(factor == 0, 1.0, factor)
    step_size.mul_(factor).clamp_min_(step_size_min).clamp_max_(step_size_max)
    g = where(factor == eta_minus, 0.0, g)
    p.addcmul_(g.sign(), step_size, value=-1)
    prev_grad.copy_(g)
    return {"prev_grad": prev_grad, "step_size": step_size}
