"""Blocks the optax recipes (`optcraft.optax`) need beyond fastai's: Lion's sign step, Nesterov
momentum, Adam with `eps_root` (and Nesterov's form of it), and LARS with optax's trust ratio."""
from __future__ import annotations

from ..tensorlist import where
from .base import block, is_zero, like_param
from .stats import momentum_of
from .steps import debias


@block(hypers=dict(mom=0.9, sqr_mom=0.99), state=dict(grad_avg=like_param), reads="elements")
def lion_step(p, lr, mom, sqr_mom, grad_avg=None, **kwargs):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
    arXiv:2302.06675): the sign of an interpolation between the momentum and the gradient,

    `p <- p - lr * sign(mom * grad_avg + (1 - mom) * g)`, then
    `grad_avg <- sqr_mom * grad_avg + (1 - sqr_mom) * g`.

    `mom` and `sqr_mom` are the paper's beta1 and beta2 (torch's `betas`); `sqr_mom` is the decay
    of the momentum itself, kept under that name so that `betas=(b1, b2)` reaches both.  Weight
    decay is a separate (decoupled) `weight_decay` block before this one.
    """
    if grad_avg is None:
        grad_avg = p.grad.zeros_like()
    p.add_(grad_avg.lerp(p.grad, 1 - mom).sign(), alpha=-lr)
    grad_avg.lerp_(p.grad, 1 - sqr_mom)
    return {"grad_avg": grad_avg}


@block(reads="elements")
def nesterov_step(p, lr, mom, grad_avg=None, **kwargs):
    """SGD with Nesterov's momentum (Sutskever et al., 2013), in torch's and optax's form: after
    `grad_avg <- mom * grad_avg + g` (`average_grad`), `p <- p - lr * (g + mom * grad_avg)`
    (`p <- p - lr * g` while `mom` is 0)."""
    if momentum_of(p, grad_avg, mom) is p.grad:
        p.add_(p.grad, alpha=-lr)
    else:
        p.add_(p.grad.add(grad_avg, alpha=mom), alpha=-lr)


@block(hypers=dict(eps=1e-8, eps_root=0.0), static=("nesterov",), switches=("eps_root",),
       reads="elements")
def adam_root_step(p, lr, mom, sqr_mom, step, grad_avg, sqr_avg, eps, eps_root=0.0,
                   nesterov=False, **kwargs):
    """Adam as optax's `scale_by_adam` computes it, with `eps_root` inside the square root:

    `p <- p - lr * m / (sqrt(sqr_avg / debias2 + eps_root) + eps)` where `m = grad_avg / debias1`,
    or with `nesterov=True` (Dozat, 2016, NAdam)
    `m = mom * grad_avg / (1 - mom**(step+1)) + (1 - mom) * g / debias1`.
    """
    debias1 = debias(mom, 1 - mom, step)
    debias2 = debias(sqr_mom, 1 - sqr_mom, step)
    denom = sqr_avg.div(debias2)
    if not is_zero(eps_root):
        denom.add_(eps_root)
    denom.sqrt_().add_(eps)
    if nesterov:
        numer = grad_avg.mul(mom / (1 - mom ** (step + 1)))
        numer.add_(p.grad, alpha=(1 - mom) / debias1)
        p.addcdiv_(numer, denom, value=-lr)
    else:
        p.addcdiv_(grad_avg, denom, value=-lr / debias1)


@block(hypers=dict(trust_coeff=0.001, eps=0.0, wd=0.0, mom=0.9), state=dict(grad_avg=like_param),
       static=("nesterov",), switches=("wd",))
def lars_step(p, lr, mom, trust_coeff, eps, wd=0.0, grad_avg=None, do_wd=True,
              do_trust_ratio=True, nesterov=False, **kwargs):
    """LARS (You et al., 2017, arXiv:1708.03888) in optax's form:

    `u = g + wd * p` (skipped where the state says `do_wd=False`),
    `q = trust_coeff * |p| / (|u| + eps)` with L2 norms, `q = 1` where either norm is 0 (and where
    the state says `do_trust_ratio=False`), then momentum on the scaled step:
    `grad_avg <- mom * grad_avg + lr * q * u`, `p <- p - grad_avg`
    (Nesterov: `p <- p - (lr * q * u + mom * grad_avg)`).

    Unlike fastai's `Larc`, the momentum buffer holds steps already multiplied by the learning
    rate, as optax's `trace` after `scale_by_learning_rate` does.
    """
    update = p.grad.add(p, alpha=wd) if do_wd and not is_zero(wd) else p.grad.clone()
    if do_trust_ratio:
        p_norm, u_norm = p.norm(), update.norm()
        ratio = p_norm.mul(trust_coeff).div_(u_norm.add(eps))
        update.mul_(where((p_norm == 0) | (u_norm == 0), 1.0, ratio))
    update.mul_(lr)
    if grad_avg is None:
        grad_avg = p.grad.zeros_like()
    grad_avg.mul_(mom).add_(update)
    if nesterov:
        p.sub_(update.add_(grad_avg, alpha=mom))
    else:
        p.sub_(grad_avg)
    return {"grad_avg": grad_avg}
