"""Issue 8: every dtype handled. float32/float64 run as they are; float16/bfloat16 parameters get
float32 state and a float32 master copy by default, so small updates are not lost."""
import pytest
import torch

import optcraft as oc

RECIPES = {
    "SGD": lambda ps, **kw: oc.SGD(ps, lr=0.05, mom=0.9, wd=1e-2, **kw),
    "RMSProp": lambda ps, **kw: oc.RMSProp(ps, lr=1e-3, mom=0.9, **kw),
    "Adam": lambda ps, **kw: oc.Adam(ps, lr=1e-2, **kw),
    "RAdam": lambda ps, **kw: oc.RAdam(ps, lr=1e-2, **kw),
    "QHAdam": lambda ps, **kw: oc.QHAdam(ps, lr=1e-2, **kw),
    "Larc": lambda ps, **kw: oc.Larc(ps, lr=0.1, **kw),
    "Lamb": lambda ps, **kw: oc.Lamb(ps, lr=1e-2, wd=0.01, **kw),
}


def quadratic_steps(opt, params, n=5):
    for _ in range(n):
        for p in params:
            p.grad = (2 * p.detach()).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_optimizer_runs_in_every_dtype(name, dtype):
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=dtype).requires_grad_(),
              torch.randn(3, dtype=dtype).requires_grad_()]
    start = [p.detach().float().clone() for p in params]
    opt = RECIPES[name](params)
    quadratic_steps(opt, params)
    for p, s in zip(params, start):
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert p.detach().float().norm() < s.norm()  # it minimised ||p||^2
    for p in params:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                expected = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
                assert v.dtype == expected, (k, v.dtype)


def test_half_precision_matches_float32_master_arithmetic():
    """With master weights, a bfloat16 parameter follows the float32 run exactly, rounded."""
    torch.manual_seed(0)
    p16 = torch.randn(50).to(torch.bfloat16).requires_grad_()
    p32 = p16.detach().float().requires_grad_()  # the same start, exactly
    o32, o16 = oc.Adam([p32], lr=1e-3), oc.Adam([p16], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        grad = torch.randn(50, generator=g).to(torch.bfloat16)
        p32.grad, p16.grad = grad.float(), grad
        o32.step()
        o16.step()
    assert torch.equal(o16.state[p16]["master_weight"], p32.detach())
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_updates_are_not_lost(dtype):
    p = torch.ones(4, dtype=dtype, requires_grad=True)
    plain = torch.ones(4, dtype=dtype, requires_grad=True)
    opt = oc.SGD([p], lr=1e-4)
    # torch's rounding (stochastic rounding, the default without master weights, is
    # tests/test_memory.py's)
    opt_plain = oc.SGD([plain], lr=1e-4, master_weights=False, rounding="nearest")
    for _ in range(300):
        p.grad = torch.ones(4, dtype=dtype)
        plain.grad = torch.ones(4, dtype=dtype)
        opt.step()
        opt_plain.step()
    # 300 steps of 1e-4: the master is at 0.97; each step alone rounds away at 1.0
    assert opt.state[p]["master_weight"].tolist() == pytest.approx([0.97] * 4, abs=1e-5)
    assert p.detach().float().tolist() == pytest.approx([0.97] * 4, abs=4e-3)
    assert plain.detach().float().tolist() == [1.0] * 4


def test_master_weights_false_keeps_state_in_param_dtype():
    p = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt = oc.Adam([p], lr=1e-3, master_weights=False)
    opt.step()
    assert opt.state[p]["grad_avg"].dtype == torch.bfloat16
    assert "master_weight" not in opt.state[p]


def train_digits(dtype, steps=150):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model = model.to(dtype)
    opt = oc.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 1500, (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx].to(dtype)).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(x[1500:].to(dtype)).float()
        return (torch.nn.functional.cross_entropy(logits, y[1500:]).item(),
                (logits.argmax(1) == y[1500:]).float().mean().item())


def test_bfloat16_training_tracks_float32():
    """Stated tolerance: after 150 Adam steps on digits, bfloat16's held-out loss is within 10%
    of float32's and its accuracy within 3 points."""
    loss32, acc32 = train_digits(torch.float32)
    loss16, acc16 = train_digits(torch.bfloat16)
    assert acc32 > 0.85
    assert abs(loss16 - loss32) <= 0.1 * loss32
    assert abs(acc16 - acc32) <= 0.03


def test_lookahead_on_half_precision_follows_float32():
    """Lookahead's slow weights and synchronisation act on the float32 master copy."""
    torch.manual_seed(0)
    p16 = torch.randn(30).to(torch.bfloat16).requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    o16 = oc.Lookahead(oc.SGD([p16], lr=0.01, mom=0.9), k=3)
    o32 = oc.Lookahead(oc.SGD([p32], lr=0.01, mom=0.9), k=3)
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        grad = torch.randn(30, generator=g).to(torch.bfloat16)
        p16.grad, p32.grad = grad, grad.float()
        o16.step()
        o32.step()
    assert torch.equal(o16.state[p16]["master_weight"], p32.detach())
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))
    assert o16.state[p16]["slow_weight"].dtype == torch.float32
