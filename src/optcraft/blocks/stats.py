"""Statistics: running averages of the gradient and its square, and the step count."""
from __future__ import annotations

from .base import block


@block(defaults=dict(mom=0.9), state=("grad_avg",))
def average_grad(p, mom, dampening=False, grad_avg=None, **kwargs):
    """Running average of the gradient.

    `grad_avg <- mom * grad_avg + g` (SGD's momentum), or with `dampening=True` the exponential
    moving average `grad_avg <- mom * grad_avg + (1 - mom) * g`.
    """
    if grad_avg is None:
        grad_avg = p.grad.zeros_like()
    if dampening:
        # lerp is one pass over memory where mul_ + add_ would be two.
        grad_avg.lerp_(p.grad, 1 - mom)
    else:
        grad_avg.mul_(mom).add_(p.grad)
    return {"grad_avg": grad_avg}


@block(defaults=dict(sqr_mom=0.99), state=("sqr_avg",), elementwise=True)
def average_sqr_grad(p, sqr_mom, dampening=True, sqr_avg=None, **kwargs):
    """Running average of the squared gradient.

    `sqr_avg <- sqr_mom * sqr_avg + (1 - sqr_mom) * g**2` (or `+ g**2` with `dampening=False`).
    """
    if sqr_avg is None:
        sqr_avg = p.grad.zeros_like()
    damp = 1 - sqr_mom if dampening else 1.0
    sqr_avg.mul_(sqr_mom).addcmul_(p.grad, p.grad, value=damp)
    return {"sqr_avg": sqr_avg}


@block(state=("step",), host=True)
def step_stat(p, step=0, **kwargs):
    """Count the steps taken: `step <- step + 1` (a Python number, also on the compiled path)."""
    return {"step": step + 1}
