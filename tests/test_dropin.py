"""optcraft where PyTorch users expect torch.optim: torch's defaults and spellings, state dicts
refused before anything changes, no half-applied step, misspelled hyperparameters (issue 20)."""
from __future__ import annotations

import inspect

import pytest
import torch

import optcraft as oc
from optcraft import registry


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).requires_grad_() for s in [(4, 3), (3,)]]


# ---- item 3: torch's defaults and spellings ----------------------------------------------------

@pytest.mark.parametrize("ours,torchs", [(oc.SGD, torch.optim.SGD), (oc.Adam, torch.optim.Adam),
                                         (oc.AdamW, torch.optim.AdamW),
                                         (oc.RMSprop, torch.optim.RMSprop),
                                         (oc.RAdam, torch.optim.RAdam)])
def test_built_without_lr_at_torchs_default(ours, torchs):
    opt = ours(_params())
    assert opt.param_groups[0]["lr"] == torchs(_params()).defaults["lr"]


@pytest.mark.parametrize("name", registry.names())
def test_every_named_optimizer_builds_without_lr(name):
    factory = registry.get(name).factory
    opt = factory(params=_params())  # `params` by keyword, as torch's take it
    assert opt.param_groups[0]["lr"] == (1e-2 if name == "RMSProp" else 1e-3)
    assert list(inspect.signature(factory).parameters)[0] == "params"


def test_torch_spellings_are_the_same_optimizers():
    assert oc.AdamW is oc.Adam and oc.RMSprop is oc.RMSProp
    # AdamW's weight decay is decoupled, as torch's: p <- p * (1 - lr * wd) before Adam's step
    p = torch.ones(3, requires_grad=True)
    opt = oc.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95))
