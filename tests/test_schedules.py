"""Schedules on any hyperparameter (issue 5.1) and torch's cycling schedulers (issue 5.6).

Expected values come from the schedules' formulas written here, from fastai's one-cycle
definition, and from torch.optim runs."""
import io
import math
import pickle
import warnings

import pytest
import torch

import optcraft as oc
from optcraft import schedules as S


# ---- the schedule objects ------------------------------------------------------------------------

def test_shapes_follow_their_formulas():
    assert [S.constant(3.0)(t) for t in (0, 10)] == [3.0, 3.0]
    assert [S.linear(1.0, 0.0, 4)(t) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    cos = S.cosine(1.0, 0.0, 10)
    assert [cos(t) for t in (0, 5, 10, 12)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert cos(2) == pytest.approx((1 + math.cos(math.pi * 0.2)) / 2)
    assert S.exponential(1.0, 0.5, steps=2)(4) == pytest.approx(0.25)
    assert S.exponential(1.0, 0.5, steps=1, end=0.1)(10) == pytest.approx(0.1)
    assert S.polynomial(1.0, 0.0, 10, power=2)(5) == pytest.approx(0.25)
    pw = S.piecewise([0.1, 0.01, 0.001], [100, 200])
    assert [pw(t) for t in (0, 99, 100, 199, 200, 10 ** 6)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_combinations():
    j = S.join([S.linear(0.0, 1.0, 10), S.constant(0.5)], [10])
    assert [j(t) for t in (0, 5, 10, 11)] == pytest.approx([0.0, 0.5, 0.5, 0.5])
    w = S.warmup_cosine(peak=1.0, warmup_steps=4, total_steps=14, end=0.0)
    assert [w(t) for t in (0, 2, 4, 9, 14)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert (S.linear(0.0, 1.0, 2) * 3 + 1)(1) == pytest.approx(2.5)
    assert S.scale(S.constant(2.0), 0.5)(7) == 1.0


def fastai_sched_cos(start, end, pos):
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


@pytest.mark.parametrize("total", [100, 40])
def test_one_cycle_is_fastais_shape(total):
    lr_max, pct = 1e-2, 0.25
    lr, mom = S.one_cycle(total, lr_max, pct_start=pct), S.one_cycle_mom(total, pct_start=pct)
    for i in range(total):
        pos = i / total
        if pos < pct:
            want_lr = fastai_sched_cos(lr_max / 25, lr_max, pos / pct)
            want_mom = fastai_sched_cos(0.95, 0.85, pos / pct)
        else:
            want_lr = fastai_sched_cos(lr_max, lr_max / 1e5, (pos - pct) / (1 - pct))
            want_mom = fastai_sched_cos(0.85, 0.95, (pos - pct) / (1 - pct))
        assert lr(i) == pytest.approx(want_lr, rel=1e-9)
        assert mom(i) == pytest.approx(want_mom, rel=1e-9)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        S.linear(1, 0, 0)
    with pytest.raises(ValueError, match="one more value than boundaries"):
        S.piecewise([1, 2], [1, 2])
    with pytest.raises(ValueError, match="increasing"):
        S.join([S.constant(1), S.constant(2), S.constant(3)], [5, 2])


# ---- schedules in an optimizer ---------------------------------------------------------------------

def sgd_run(lr, n, **kw):
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = oc.SGD([p], lr=lr, **kw)
    seen = []
    for _ in range(n):
        p.grad = torch.ones(1, dtype=torch.float64)
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
    return p, opt, seen


def test_the_schedule_drives_the_step_and_param_groups_show_it():
    sched = S.linear(0.4, 0.0, 4)
    p, opt, seen = sgd_run(sched, 6)
    # param_groups hold the value used by the step that follows (step 0 at construction)
    assert seen == pytest.approx([0.4, 0.4, 0.3, 0.2, 0.1, 0.0])
    assert p.item() == pytest.approx(-(0.4 + 0.3 + 0.2 + 0.1 + 0.0 + 0.0))
    assert opt.schedule_step == 6


def test_plain_callable_and_lists_per_group():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = oc.SGD([[a], [b]], lr=[lambda t: 0.1 * (t + 1), 0.5])
    for _ in range(3):
        a.grad, b.grad = torch.ones(1), torch.ones(1)
        opt.step()
    assert a.item() == pytest.approx(-(0.1 + 0.2 + 0.3))
    assert b.item() == pytest.approx(-1.5)


def test_momentum_schedule_changes_the_momentum_used():
    """mom follows its schedule inside the chain: compare with a hand-written momentum SGD."""
    mom = S.linear(0.9, 0.5, 4)
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = oc.SGD([p], lr=0.1, mom=mom)
    x, buf = 0.0, 0.0
    for t in range(6):
        g = float(t + 1)
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        buf = mom(t) * buf + g
        x -= 0.1 * buf
    assert p.item() == pytest.approx(x, rel=1e-12)


def test_set_hyper_installs_and_removes_schedules():
    p, opt, _ = sgd_run(0.1, 2)
    opt.set_hyper("lr", S.linear(1.0, 0.0, 10))
    assert opt.hypers[0]["lr"] == pytest.approx(0.8)  # two steps already taken
    opt.set_hyper("lr", 0.05)
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    assert opt.hypers[0]["lr"] == 0.05


def test_schedule_values_are_validated():
    with pytest.raises(ValueError, match=r"lr \(parameter group 0\) must be in"):
        oc.SGD([torch.zeros(1, requires_grad=True)], lr=S.constant(-0.1))
    p = torch.zeros(1, requires_grad=True)
    opt = oc.SGD([p], lr=S.linear(0.1, -0.1, 2))  # valid at step 0 and 1 ...
    for _ in range(2):
        p.grad = torch.ones(1)
        opt.step()
    p.grad = torch.ones(1)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="lr"):  # ... but not at step 2
        opt.step()
    assert torch.equal(p.detach(), before)


def test_state_dict_holds_progress_not_callables_and_resumes_exactly():
    def make(ps):
        return oc.Adam(ps, lr=S.warmup_cosine(1e-2, 3, 12), mom=S.one_cycle_mom(12), wd=0.01)

    def data():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(5, generator=g) for _ in range(12)]

    p = torch.ones(5, requires_grad=True)
    opt = make([p])
    for g in data():
        p.grad = g.clone()
        opt.step()
    uninterrupted = p.detach().clone()

    q = torch.ones(5, requires_grad=True)
    opt = make([q])
    for g in data()[:5]:
        q.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"p": q.detach(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["schedule_step"] == 5
    r = ckpt["p"].clone().requires_grad_()
    opt2 = make([r])
    opt2.load_state_dict(ckpt["opt"])
    for g in data()[5:]:
        r.grad = g.clone()
        opt2.step()
    assert torch.equal(r.detach(), uninterrupted)


def test_schedules_survive_pickling():
    p = torch.zeros(2, requires_grad=True)
    opt = oc.Adam([p], lr=S.one_cycle(50, 1e-2))
    copy = pickle.loads(pickle.dumps(opt))
    assert copy._schedules[0]["lr"](10) == S.one_cycle(50, 1e-2)(10)


# ---- with torch's schedulers ----------------------------------------------------------------------

def test_a_schedule_owns_its_hyperparameter_over_a_torch_scheduler():
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    sched = S.constant(0.1)
    opt = oc.SGD([p], lr=sched)
    torch_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.warns(UserWarning, match="lr .* follows a schedule"):
        for _ in range(3):
            p.grad = torch.ones(1, dtype=torch.float64)
            opt.step()
            torch_sched.step()
    assert p.item() == pytest.approx(-0.3)  # every step used the schedule's 0.1


def test_torch_scheduler_on_lr_and_a_schedule_on_wd_coexist():
    p = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = oc.SGD([p], lr=0.1, wd=S.piecewise([0.0, 0.5], [2]))
    torch_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(4):
            lr, wd = 0.1 * 0.5 ** t, (0.0 if t < 2 else 0.5)
            p.grad = torch.ones(1, dtype=torch.float64)
            opt.step()
            torch_sched.step()
            x = x * (1 - lr * wd) - lr
    assert p.item() == pytest.approx(x, rel=1e-12)


def train_pair(make_ours, make_theirs, make_sched, n=30):
    torch.manual_seed(0)
    m1 = torch.nn.Linear(4, 3).double()
    m2 = torch.nn.Linear(4, 3).double()
    m2.load_state_dict(m1.state_dict())
    o1, o2 = make_ours(m1.parameters()), make_theirs(m2.parameters())
    s1, s2 = make_sched(o1), make_sched(o2)
    g = torch.Generator().manual_seed(1)
    moms = []
    for _ in range(n):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
            s.step()
        moms.append(o1.param_groups[0]["mom"])
    return m1, m2, moms


def test_cycliclr_with_cycle_momentum_on_optcraft_sgd():
    m1, m2, moms = train_pair(
        lambda ps: oc.SGD(ps, lr=0.01, mom=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=5,
                                                    cycle_momentum=True, base_momentum=0.8,
                                                    max_momentum=0.9))
    assert min(moms) == pytest.approx(0.8) and max(moms) == pytest.approx(0.9)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_onecyclelr_with_cycle_momentum_on_optcraft_adam():
    m1, m2, moms = train_pair(
        lambda ps: oc.Adam(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=0.0),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.99), eps=1e-8),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=31))
    assert min(moms) == pytest.approx(0.85, abs=2e-3) and moms[0] < 0.95
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
