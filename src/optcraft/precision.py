"""Half-precision parameters: float32 state, and small updates that are not lost.

A bfloat16 weight near 1.0 cannot move by less than 2**-8: an update of `lr * g = 1e-4` rounds
away, step after step, and the model stops learning.  For float16 and bfloat16 parameters the
engine therefore runs the chain on a float32 *master copy* of each parameter, kept in its state as
`state[p]['master_weight']`, with the gradient upcast to float32; the state the blocks create is
float32 too (they allocate like the gradient they see).  After the chain the master is rounded
back into the parameter.  This is the classic mixed-precision recipe (Micikevicius et al., 2018,
arXiv:1710.03740); it costs 4 bytes per parameter for the master plus float32 state.

`Optimizer(..., master_weights=False)` keeps torch.optim's behaviour instead: the chain runs on the
parameter itself and the state has the parameter's dtype (half the memory, updates below the
parameter's resolution lost).

The master is the truth: a parameter written from outside the optimizer (loading weights into the
model) should be followed by `opt.clear_state()` or `load_state_dict`, else the next step
continues from the master.
"""
from __future__ import annotations

import torch

from .tensorlist import TensorList

LOW_PRECISION = (torch.float16, torch.bfloat16)
MASTER = "master_weight"


def uses_master(dtype: torch.dtype, master_weights: bool) -> bool:
    return master_weights and dtype in LOW_PRECISION


def masters_of(params, state) -> list[torch.Tensor]:
    """The float32 master copies of `params`, created from the parameters on first use."""
    masters = []
    for p in params:
        master = state[p].get(MASTER)
        if master is None:
            master = p.detach().to(torch.float32, copy=True)
            state[p][MASTER] = master
        masters.append(master)
    return masters


def upcast(grads) -> list[torch.Tensor]:
    return [g.to(torch.float32) for g in grads]


@torch.no_grad()
def write_back(params, masters) -> None:
    """Round the masters into the parameters (copy_ converts the dtype)."""
    TensorList(params).copy_(masters)
