"""Weight decay, decoupled or as L2 regularisation."""
from __future__ import annotations

from .base import block, is_zero


@block(hypers=dict(wd=0.0), switches=("wd",))
def weight_decay(p, lr, wd, do_wd=True, **kwargs):
    """Decoupled weight decay: `p <- p * (1 - lr * wd)`.

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019). Skipped where the
    parameter's state holds `do_wd=False` (biases and norms, say).
    """
    if do_wd and not is_zero(wd):
        p.mul_(1 - lr * wd)


@block(hypers=dict(wd=0.0), switches=("wd",))
def l2_reg(p, lr, wd, do_wd=True, **kwargs):
    """L2 regularisation: `g <- g + wd * p`.

    The new gradient is seen by the blocks after this one; the tensors in the parameters' own
    `.grad` are not changed during `Optimizer.step` (called on one tensor, as in fastai, the
    tensor's `.grad` is replaced).
    """
    if do_wd and not is_zero(wd):
        p.grad = p.grad.add(p, alpha=wd)
