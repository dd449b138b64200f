"""The calls that training frameworks make, without the frameworks (docs/integration.md).

The Hugging Face Trainer gives param-group dicts in torch's names (`weight_decay`); fastai's
schedulers set one value per group as a numpy array; both are checked against torch.optim.  The
runnable snippets of docs/integration.md (the plain loop, the optimizer class for the Trainer) are
run from the page itself, so the page cannot drift from the API.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import optcraft as oc

PAGE = Path(__file__).resolve().parents[1] / "docs" / "integration.md"


def _snippet(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{len(found)} python blocks of {PAGE.name} contain {containing!r}"
    return found[0]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64)),
            nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))]


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _run(opt, params, steps=6):
    for step in range(steps):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


def test_plain_loop_example_runs_and_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_snippet("for step in range(100):"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    torch.manual_seed(0)
    untrained = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))
    with torch.no_grad():
        assert nn.functional.mse_loss(model(x), y) < nn.functional.mse_loss(untrained(x), y)
    assert (tmp_path / "checkpoint.pt").exists()


def test_trainer_groups_in_torch_names_match_torch_adamw():
    """The Hugging Face Trainer's groups: `weight_decay` per group, read as optcraft's `wd`."""
    ours, theirs = _params(), _params()
    opt = oc.Adam([{"params": [ours[0]], "weight_decay": 0.1},
                   {"params": [ours[1]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999),
                  eps=1e-8)
    assert [g["wd"] for g in opt.param_groups] == [0.1, 0.0]
    reference = torch.optim.AdamW([{"params": [theirs[0]], "weight_decay": 0.1},
                                   {"params": [theirs[1]], "weight_decay": 0.0}], lr=1e-2,
                                  betas=(0.9, 0.999), eps=1e-8)
    torch.testing.assert_close(_run(opt, ours), _run(reference, theirs), rtol=1e-12, atol=1e-14)


def test_optimizer_class_for_the_trainer_is_lamb():
    """The `oc.Optimizer` subclass the page gives to `optimizer_cls_and_kwargs` is `oc.Lamb`."""
    namespace: dict = {"oc": oc}
    exec(_snippet("class Lamb(oc.Optimizer)"), namespace)
    ours, theirs = _params(), _params()
    as_class = namespace["Lamb"]([{"params": ours, "weight_decay": 0.1}], lr=1e-2)
    assert isinstance(as_class, torch.optim.Optimizer)
    named = oc.Lamb(theirs, lr=1e-2, wd=0.1)
    assert as_class.hypers == named.hypers
    for a, b in zip(_run(as_class, ours), _run(named, theirs)):
        assert torch.equal(a, b)


def test_fastai_schedulers_numpy_values_per_group_match_torch_sgd():
    """fastai's ParamScheduler calls `set_hyper('lr', array)` with one value per group."""
    np = pytest.importorskip("numpy")
    ours, theirs = _params(), _params()
    opt = oc.SGD([[ours[0]], [ours[1]]], lr=1.0, mom=0.9)
    opt.set_hyper("lr", np.array([1e-3, 1e-1]))
    opt.set_hyper("mom", np.float64(0.8))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-1]
    assert all(type(g["lr"]) is float and type(g["mom"]) is float for g in opt.param_groups)
    reference = torch.optim.SGD([{"params": [theirs[0]], "lr": 1e-3},
                                 {"params": [theirs[1]], "lr": 1e-1}], lr=1.0, momentum=0.8)
    torch.testing.assert_close(_run(opt, ours), _run(reference, theirs), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="2 values for 3 parameter group"):
        oc.SGD([[p] for p in _params() + _params(1)[:1]], lr=np.array([0.1, 0.2]))
    with pytest.raises(TypeError, match="not one value or one row"):
        oc.SGD([[p] for p in _params()], lr=np.ones((2, 2)))
