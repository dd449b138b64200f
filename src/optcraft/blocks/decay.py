"""Weight decay, decoupled or as L2 regularisation."""
from __future__ import annotations

import torch

from .base import block


def _may_be_nonzero(wd) -> bool:
    """`wd != 0` for a number; True for a tensor, whose value is not known while `torch.compile`
    traces (the decay is then applied, and is a no-op when the value is 0)."""
    return isinstance(wd, torch.Tensor) or wd != 0


@block(defaults=dict(wd=0.0))
def weight_decay(p, lr, wd, do_wd=True, **kwargs):
    """Decoupled weight decay: `p <- p * (1 - lr * wd)`.

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019). Skipped where the
    parameter's state holds `do_wd=False` (biases and norms, say).
    """
    if do_wd and _may_be_nonzero(wd):
        p.mul_(1 - lr * wd)


@block(defaults=dict(wd=0.0))
def l2_reg(p, lr, wd, do_wd=True, **kwargs):
    """L2 regularisation: `g <- g + wd * p`.

    The new gradient is seen by the blocks after this one; the tensors in the parameters' own
    `.grad` are not changed during `Optimizer.step` (called on one tensor, as in fastai, the
    tensor's `.grad` is replaced).
    """
    if do_wd and _may_be_nonzero(wd):
        p.grad = p.grad.add(p, alpha=wd)
