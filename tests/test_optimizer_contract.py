"""The drop-in contract of issue 2: torch's schedulers, GradScaler, checkpoints with exact resume,
add_param_group, hooks, deepcopy/pickle, torch's names, validation, and the fastai API's edges."""
import copy
import io
import pickle

import pytest
import torch

import optcraft as oc


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(40)]
    return model, data


def train_steps(model, opt, data, sched=None, scaler=None):
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- torch's schedulers and GradScaler ----------------------------------------------------------------

def test_steplr_drives_lr_like_on_torch_sgd():
    m1, data = model_and_data()
    opt1 = oc.SGD(m1.parameters(), lr=0.1, mom=0.9, wd=1e-3, decouple_wd=False)
    s1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=7, gamma=0.5)
    train_steps(m1, opt1, data, s1)
    m2, _ = model_and_data()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    s2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7, gamma=0.5)
    train_steps(m2, opt2, data, s2)
    assert opt1.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"])
    for a, b in zip(params_of(m1), params_of(m2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_onecycle_with_momentum_cycles_betas_like_on_torch_adamw():
    m1, data = model_and_data()
    opt1 = oc.Adam(m1.parameters(), lr=1e-3, betas=(0.95, 0.99), eps=1e-8, wd=0.01)
    s1 = torch.optim.lr_scheduler.OneCycleLR(opt1, max_lr=0.01, total_steps=len(data))
    m2, _ = model_and_data()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3, betas=(0.95, 0.99), eps=1e-8,
                             weight_decay=0.01)
    s2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=0.01, total_steps=len(data))
    moms = []
    for (x, y) in data:
        for m, opt, s in ((m1, opt1, s1), (m2, opt2, s2)):
            loss = torch.nn.functional.mse_loss(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            s.step() if s.last_epoch < len(data) - 1 else None
        moms.append(opt1.param_groups[0]["mom"])
        assert opt1.param_groups[0]["betas"] == pytest.approx(opt2.param_groups[0]["betas"])
    assert min(moms) == pytest.approx(0.85, abs=1e-3) and max(moms) == pytest.approx(0.95)
    for a, b in zip(params_of(m1), params_of(m2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradscaler_on_cpu_unscales_and_skips_inf():
    m1, data = model_and_data()
    opt1 = oc.Adam(m1.parameters(), lr=1e-2, wd=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    train_steps(m1, opt1, data[:10], scaler=scaler)
    m2, _ = model_and_data()
    opt2 = oc.Adam(m2.parameters(), lr=1e-2, wd=0.0)
    train_steps(m2, opt2, data[:10])
    for a, b in zip(params_of(m1), params_of(m2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # an inf gradient: the scaler skips the step and the state is untouched
    before = params_of(m1)
    state_before = {k: v.clone() for k, v in opt1.state[next(m1.parameters())].items()
                    if isinstance(v, torch.Tensor)}
    loss = m1(data[0][0]).sum() * float("inf")
    opt1.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt1)
    scaler.update()
    for a, b in zip(params_of(m1), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k, v in state_before.items():
        torch.testing.assert_close(opt1.state[next(m1.parameters())][k], v, rtol=0, atol=0)


# ---- checkpoints ----------------------------------------------------------------------------------------

RECIPES = {
    "SGD": lambda ps: oc.SGD(ps, lr=0.05, mom=0.9, wd=1e-2),
    "RMSProp": lambda ps: oc.RMSProp(ps, lr=1e-3, mom=0.9),
    "Adam": lambda ps: oc.Adam(ps, lr=1e-2),
    "RAdam": lambda ps: oc.RAdam(ps, lr=1e-2),
    "QHAdam": lambda ps: oc.QHAdam(ps, lr=1e-2),
    "Larc": lambda ps: oc.Larc(ps, lr=0.1),
    "Lamb": lambda ps: oc.Lamb(ps, lr=1e-2, wd=0.01),
    "ranger": lambda ps: oc.ranger(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_resume_from_checkpoint_is_bit_exact(name):
    make = RECIPES[name]
    m1, data = model_and_data()
    opt1 = make(m1.parameters())
    train_steps(m1, opt1, data)
    uninterrupted = params_of(m1)

    m2, _ = model_and_data()
    opt2 = make(m2.parameters())
    train_steps(m2, opt2, data[:17])
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m3, _ = model_and_data(seed=7)  # different weights, overwritten by the checkpoint
    m3.load_state_dict(ckpt["model"])
    opt3 = make(m3.parameters())
    opt3.load_state_dict(ckpt["opt"])
    train_steps(m3, opt3, data[17:])
    for a, b in zip(params_of(m3), uninterrupted):
        assert torch.equal(a, b)


def test_hyperparameters_round_trip_through_state_dict():
    m, data = model_and_data()
    opt = oc.Adam([list(m[0].parameters()), list(m[2].parameters())], lr=[1e-3, 1e-2], wd=0.1)
    opt.set_hyper("mom", 0.8)
    sd = opt.state_dict()
    opt2 = oc.Adam([list(m[0].parameters()), list(m[2].parameters())], lr=0.5)
    opt2.load_state_dict(sd)
    assert [dict(h) for h in opt2.hypers] == [dict(h) for h in opt.hypers]


def test_mismatched_state_dict_is_refused_and_changes_nothing():
    m, data = model_and_data()
    opt = oc.Adam(m.parameters(), lr=1e-2)
    train_steps(m, opt, data[:2])
    good = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())

    def check_untouched():
        now = opt.state_dict()
        assert now["param_groups"] == before["param_groups"]
        for k, st in before["state"].items():
            for name, v in st.items():
                assert torch.equal(now["state"][k][name], v) if isinstance(v, torch.Tensor) \
                    else now["state"][k][name] == v

    other = oc.Adam([list(m[0].parameters()), list(m[2].parameters())], lr=1e-2)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(other.state_dict())
    check_untouched()
    fewer = oc.Adam(list(m.parameters())[:3], lr=1e-2).state_dict()
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(fewer)
    check_untouched()
    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][0]["grad_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(wrong_shape)
    check_untouched()
    bad_hyper = copy.deepcopy(good)
    bad_hyper["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad_hyper)
    check_untouched()
    with pytest.raises(ValueError, match="state dict"):
        opt.load_state_dict({"state": {}})
    check_untouched()


# ---- torch's machinery ---------------------------------------------------------------------------------

def test_add_param_group_gets_defaults_and_trains():
    m, data = model_and_data()
    opt = oc.Adam(m[0].parameters(), lr=1e-2, wd=0.0)
    opt.add_param_group({"params": m[2].parameters(), "lr": 1e-3})
    assert len(opt.param_groups) == 2
    assert opt.hypers[1]["lr"] == 1e-3 and opt.hypers[1]["mom"] == 0.9
    before = params_of(m)
    train_steps(m, opt, data[:3])
    assert all(not torch.equal(a, b) for a, b in zip(params_of(m), before))
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [m[0].weight]})
    assert len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1})
    assert len(opt.param_groups) == 2


def test_step_and_state_dict_hooks():
    m, data = model_and_data()
    opt = oc.Lamb(m.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: sd.update(extra=1) or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    train_steps(m, opt, data[:2])
    assert calls == ["pre", "post", "pre", "post"]
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls[-1] == "load-pre"


def test_closure_returns_loss():
    m, data = model_and_data()
    opt = oc.SGD(m.parameters(), lr=0.1)
    x, y = data[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0


@pytest.mark.parametrize("name", ["Adam", "ranger", "Larc"])
def test_deepcopy_and_pickle_continue_identically(name):
    m, data = model_and_data()
    opt = RECIPES[name](m.parameters())
    train_steps(m, opt, data[:5])
    m_copy, opt_copy = copy.deepcopy((m, opt))
    m_pickled, opt_pickled = pickle.loads(pickle.dumps((m, opt)))
    for mm, oo in ((m, opt), (m_copy, opt_copy), (m_pickled, opt_pickled)):
        train_steps(mm, oo, data[5:10])
    for a, b, c in zip(params_of(m), params_of(m_copy), params_of(m_pickled)):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_named_parameters_are_accepted():
    m, data = model_and_data()
    opt = oc.Adam(m.named_parameters(), lr=1e-2)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in m.named_parameters()]
    train_steps(m, opt, data[:2])
    assert "param_names" in opt.state_dict()["param_groups"][0]
    assert "param_names" not in opt.hypers[0]


def test_tensor_lr():
    m1, data = model_and_data()
    opt1 = oc.Adam(m1.parameters(), lr=torch.tensor(1e-2))
    train_steps(m1, opt1, data[:5])
    m2, _ = model_and_data()
    opt2 = oc.Adam(m2.parameters(), lr=1e-2)
    train_steps(m2, opt2, data[:5])
    for a, b in zip(params_of(m1), params_of(m2)):
        torch.testing.assert_close(a, b)


# ---- torch's names and validation ----------------------------------------------------------------------

def test_torch_names_are_aliases():
    p = [torch.zeros(3, requires_grad=True)]
    opt = oc.Adam(p, lr=1e-3, betas=(0.8, 0.9), weight_decay=0.2)
    assert dict(opt.hypers[0]) == {"lr": 1e-3, "mom": 0.8, "sqr_mom": 0.9, "eps": 1e-5, "wd": 0.2}
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["weight_decay"] == 0.2
    assert "betas" in opt.defaults and "momentum" in opt.defaults
    opt.param_groups[0]["betas"] = (0.7, 0.95)
    assert opt.hypers[0]["mom"] == 0.7 and opt.hypers[0]["sqr_mom"] == 0.95
    assert "betas" not in opt.state_dict()["param_groups"][0]
    sgd = oc.SGD(p, lr=0.1, momentum=0.9)
    assert sgd.hypers[0]["mom"] == 0.9
    opt.set_hyper("momentum", 0.5)
    assert opt.hypers[0]["mom"] == 0.5


@pytest.mark.parametrize("kwargs, name", [
    (dict(mom=0.9, betas=(0.9, 0.99)), "betas"),
    (dict(wd=0.1, weight_decay=0.1), "weight_decay"),
])
def test_both_spellings_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        oc.Adam([torch.zeros(2, requires_grad=True)], lr=1e-3, **kwargs)


def test_both_spellings_raise_for_sgd_momentum():
    with pytest.raises(ValueError, match="momentum"):
        oc.SGD([torch.zeros(2, requires_grad=True)], lr=1e-3, mom=0.9, momentum=0.9)


@pytest.mark.parametrize("make, name", [
    (lambda p: oc.SGD(p, lr=-0.1), "lr"),
    (lambda p: oc.SGD(p, lr=0.1, mom=1.0), "mom"),
    (lambda p: oc.SGD(p, lr=0.1, mom=-0.1), "mom"),
    (lambda p: oc.Adam(p, lr=0.1, eps=-1e-8), "eps"),
    (lambda p: oc.Adam(p, lr=0.1, wd=-1), "wd"),
    (lambda p: oc.Adam(p, lr=0.1, betas=(0.9, 1.5)), "sqr_mom"),
    (lambda p: oc.QHAdam(p, lr=0.1, nu_1=2.0), "nu_1"),
    (lambda p: oc.Larc(p, lr=0.1, trust_coeff=-1.0), "trust_coeff"),
    (lambda p: oc.RAdam(p, lr=0.1, beta=-1.0), "beta"),
    (lambda p: oc.Adam(p, lr="fast"), "lr"),
    (lambda p: oc.Adam(p, lr=float("nan")), "lr"),
    (lambda p: oc.Lookahead(oc.SGD(p, lr=0.1), k=0), "k"),
    (lambda p: oc.Lookahead(oc.SGD(p, lr=0.1), alpha=1.5), "alpha"),
    (lambda p: oc.Adam(p, lr=0.1, impl="fastest"), "impl"),
])
def test_bad_hyperparameters_name_themselves(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make([torch.zeros(2, requires_grad=True)])


def test_set_hyper_validates_before_changing_anything():
    p = [[torch.zeros(2, requires_grad=True)], [torch.zeros(2, requires_grad=True)]]
    opt = oc.Adam(p, lr=0.1)
    with pytest.raises(ValueError, match=r"mom \(parameter group 1\)"):
        opt.set_hypers(lr=0.5, mom=[0.9, 1.2])
    assert [h["lr"] for h in opt.hypers] == [0.1, 0.1]
    assert [h["mom"] for h in opt.hypers] == [0.9, 0.9]


def test_invalid_value_set_directly_is_refused_at_step():
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    opt = oc.SGD([p], lr=0.1)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"lr \(parameter group 0\)"):
        opt.step()
    assert torch.equal(p, torch.zeros(2))


def test_freeze_needs_two_groups():
    with pytest.raises(ValueError, match="two parameter groups"):
        oc.SGD([torch.zeros(2, requires_grad=True)], lr=0.1).freeze()


def test_zero_grad_set_to_none():
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    oc.SGD([p], lr=0.1).zero_grad(set_to_none=True)
    assert p.grad is None


def test_repr_shows_groups_and_chain():
    text = repr(oc.Adam([torch.zeros(2, requires_grad=True)], lr=0.1))
    assert "lr: 0.1" in text and "adam_step" in text and "average_grad(dampening=True)" in text
