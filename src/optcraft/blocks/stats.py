"""Statistics: running averages of the gradient and its square, and the step count."""
from __future__ import annotations

from .base import block, is_zero, like_param, nonnegative, number, optional


def _without_dampening(dampening=False, **kwargs) -> bool:
    return not dampening


@block(hypers=dict(mom=0.9), state=dict(grad_avg=optional(like_param, _without_dampening)),
       switches=("mom",))
def average_grad(p, mom, dampening=False, grad_avg=None, **kwargs):
    """Running average of the gradient.

    `grad_avg <- mom * grad_avg + g` (SGD's momentum), or with `dampening=True` the exponential
    moving average `grad_avg <- mom * grad_avg + (1 - mom) * g`.

    Without dampening, `mom` is a switch, as torch's SGD has it: while it is 0 no buffer is made
    or updated (the steps after it use the gradient), and the buffer is made, equal to the
    gradient, at the first step with `mom != 0`.
    """
    if not dampening and is_zero(mom):
        return None
    if grad_avg is None:
        grad_avg = p.grad.zeros_like()
    if dampening:
        # lerp is one pass over memory where mul_ + add_ would be two.
        grad_avg.lerp_(p.grad, 1 - mom)
    else:
        grad_avg.mul_(mom).add_(p.grad)
    return {"grad_avg": grad_avg}


def momentum_of(p, grad_avg, mom):
    """The direction a step takes: the gradient's running average `grad_avg` where one is kept
    and its momentum is on (`mom != 0`), else the gradient itself."""
    return p.grad if grad_avg is None or is_zero(mom) else grad_avg


@block(hypers=dict(sqr_mom=0.99), state=dict(sqr_avg=nonnegative(like_param)),
       reads="elements")
def average_sqr_grad(p, sqr_mom, dampening=True, sqr_avg=None, **kwargs):
    """Running average of the squared gradient.

    `sqr_avg <- sqr_mom * sqr_avg + (1 - sqr_mom) * g**2` (or `+ g**2` with `dampening=False`).
    """
    if sqr_avg is None:
        sqr_avg = p.grad.zeros_like()
    damp = 1 - sqr_mom if dampening else 1.0
    sqr_avg.mul_(sqr_mom).addcmul_(p.grad, p.grad, value=damp)
    return {"sqr_avg": sqr_avg}


@block(state=dict(step=number), reads="numbers")
def step_stat(p, step=0, **kwargs):
    """Count the steps taken: `step <- step + 1` (a Python number, also on the compiled path)."""
    return {"step": step + 1}
