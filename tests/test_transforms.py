"""Whole-model transforms around optcraft's and torch's optimizers.

Expected numbers come from formulas written here (global norm, Brock et al.'s unit-wise rule,
the mean of k gradients) and from torch.optim runs; the skip transform must leave parameters,
state and schedules bitwise untouched; checkpoints must resume bit for bit."""
import copy
import io
import math
import pickle

import pytest
import torch

import optcraft as oc
from optcraft import schedules
from optcraft.transforms import (Transform, Transformed, accumulate, adaptive_clip,
                                 clip_by_global_norm, skip_nonfinite)


def leaves(*shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- clipping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_follows_the_formula(max_norm):
    params = leaves((3, 4), (4,), ())
    grads = [torch.randn(p.shape, dtype=torch.float64) for p in params]
    total = math.sqrt(sum(float(x) ** 2 for g in grads for x in g.flatten()))
    factor = min(1.0, max_norm / (total + 1e-6))
    before = [p.detach().clone() for p in params]
    clip = clip_by_global_norm(max_norm)
    opt = Transformed(torch.optim.SGD(params, lr=0.1), clip)
    set_grads(params, grads)
    opt.step()
    assert clip.last_norm.item() == pytest.approx(total, rel=1e-12)
    for p, b, g in zip(params, before, grads):
        torch.testing.assert_close(p.grad, g * factor, rtol=1e-12, atol=0)
        torch.testing.assert_close(p.detach(), b - 0.1 * g * factor, rtol=1e-12, atol=1e-15)


def unit_norms_by_hand(t):
    """One norm per unit written out: the whole tensor for ndim <= 1, else each t[i]."""
    if t.dim() <= 1:
        return [math.sqrt(sum(float(x) ** 2 for x in t.flatten()))]
    return [math.sqrt(sum(float(x) ** 2 for x in row.flatten())) for row in t]


def test_adaptive_clip_is_brock_et_al_unit_by_unit():
    clipping, eps = 0.05, 1e-3
    w, b, conv, zero, head = leaves((4, 3), (4,), (2, 3, 2, 2), (3,), (2, 4))
    with torch.no_grad():
        zero.zero_()
    params = [w, b, conv, zero, head]
    g = torch.Generator().manual_seed(3)
    # some units far above the clipping threshold, some below
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) *
             (0.001 if i == 1 else 1.0) for i, p in enumerate(params)]
    grads[0][1] *= 1e-4
    opt = Transformed(oc.SGD(params, lr=0.0), adaptive_clip(clipping, eps, exclude=[head]))
    set_grads(params, grads)
    opt.step()
    for p, g0 in zip(params[:4], grads[:4]):
        w_norms, g_norms = unit_norms_by_hand(p.detach()), unit_norms_by_hand(g0)
        units = [g0] if p.dim() <= 1 else list(g0)
        got = [p.grad] if p.dim() <= 1 else list(p.grad)
        for wn, gn, unit, out in zip(w_norms, g_norms, units, got):
            max_norm = clipping * max(wn, eps)
            want = unit * (max_norm / gn) if gn > max_norm else unit
            torch.testing.assert_close(out, want, rtol=1e-12, atol=0)
    assert torch.equal(head.grad, grads[4])  # excluded, as the paper leaves the classifier
    assert torch.equal(params[0].grad[1], grads[0][1])  # a small unit is not clipped


# ---- skipping non-finite steps ------------------------------------------------------------------

def snapshot(opt, params):
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for i, p in enumerate(params)}
    return [p.detach().clone() for p in params], state, copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


@pytest.mark.parametrize("make", [
    lambda ps: oc.Adam(ps, lr=schedules.linear(0.1, 0.01, 10), wd=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.1),
    lambda ps: oc.Lookahead(oc.Lamb(ps, lr=0.1), k=2),
], ids=["optcraft-Adam-scheduled", "torch-AdamW", "Lookahead-Lamb"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_skip_nonfinite_changes_nothing(make, bad):
    params = leaves((3, 2), (2,))
    skip = skip_nonfinite()
    opt = Transformed(make(params), skip)
    set_grads(params, [torch.ones(3, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
    opt.step()
    assert opt.stepped and skip.skips == 0
    before = snapshot(opt.opt, params)
    steps_before = getattr(opt.opt, "schedule_step", None)
    grads = [torch.ones(3, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    grads[1][0] = bad
    set_grads(params, grads)
    opt.step()
    assert not opt.stepped and skip.skips == 1 and skip.last_skipped
    after = snapshot(opt.opt, params)
    for a, b in zip(after[0], before[0]):
        assert torch.equal(a, b)
    assert after[1].keys() == before[1].keys()
    for i in before[1]:
        assert after[1][i].keys() == before[1][i].keys()
        for k, v in before[1][i].items():
            assert torch.equal(after[1][i][k], v) if isinstance(v, torch.Tensor) else \
                after[1][i][k] == v
    assert after[2] == before[2]
    assert getattr(opt.opt, "schedule_step", None) == steps_before
    assert opt.state_dict()["transforms"][0]["skips"] == 1


def test_a_nan_never_enters_the_state_with_the_guard_on():
    params = leaves((5, 3), (3,))
    opt = Transformed(oc.Adam(params, lr=1e-2), skip_nonfinite())
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        if i % 4 == 1:
            grads[i % 2].view(-1)[i % 3] = math.nan if i % 8 == 1 else math.inf
        set_grads(params, grads)
        opt.step()
    assert opt.transforms[0].skips == 8
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))
    assert all(st["step"] == 22 for st in opt.state.values())


# ---- accumulation ------------------------------------------------------------------------------

def test_accumulate_steps_once_on_the_mean_of_k_gradients():
    params = leaves((3, 2), (2,))
    start = [p.detach().clone() for p in params]
    opt = Transformed(torch.optim.SGD(params, lr=0.5), accumulate(3))
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
             for _ in range(6)]
    grads[1][1] = None  # a micro-batch without a gradient for the bias counts as zeros
    done = []
    for i, gs in enumerate(grads):
        opt.zero_grad()
        set_grads(params, gs)
        opt.step()
        done.append(opt.stepped)
        if i == 1:  # mid-window: nothing moved
            for p, s in zip(params, start):
                assert torch.equal(p.detach(), s)
    assert done == [False, False, True, False, False, True]
    for j, (p, s) in enumerate(zip(params, start)):
        total = torch.zeros_like(s)
        for window in (grads[:3], grads[3:]):
            mean = sum((gs[j] if gs[j] is not None else torch.zeros_like(s)) for gs in window) / 3
            total += 0.5 * mean
        torch.testing.assert_close(p.detach(), s - total, rtol=1e-12, atol=1e-15)


def test_accumulating_micro_batches_equals_one_big_batch():
    torch.manual_seed(0)
    big, small = torch.nn.Linear(4, 2).double(), torch.nn.Linear(4, 2).double()
    small.load_state_dict(big.state_dict())
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    opt_big = torch.optim.AdamW(big.parameters(), lr=0.01)
    opt_small = Transformed(torch.optim.AdamW(small.parameters(), lr=0.01), accumulate(4))
    for _ in range(3):
        opt_big.zero_grad()
        torch.nn.functional.mse_loss(big(x), y).backward()
        opt_big.step()
        for xs, ys in zip(x.split(3), y.split(3)):
            opt_small.zero_grad()
            torch.nn.functional.mse_loss(small(xs), ys).backward()
            opt_small.step()
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_schedules_count_optimizer_steps_under_accumulation():
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    sched = schedules.linear(0.4, 0.0, 4)
    opt = Transformed(oc.SGD([p], lr=sched), accumulate(2))
    for _ in range(8):
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    assert opt.opt.schedule_step == 4
    assert p.item() == pytest.approx(-(0.4 + 0.3 + 0.2 + 0.1))


def test_torch_scheduler_stepped_with_the_optimizer_under_accumulation():
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = Transformed(torch.optim.SGD([p], lr=0.1), accumulate(2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(6):
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        if opt.stepped:
            sched.step()
    assert p.item() == pytest.approx(-(0.1 + 0.05 + 0.025))


def test_half_precision_gradients_accumulate_in_float32():
    p = torch.zeros(1, dtype=torch.bfloat16, requires_grad=True)
    opt = Transformed(torch.optim.SGD([p], lr=1.0), accumulate(4))
    for g in (256.0, 1.0, 1.0, 2.0):  # in bfloat16, 256 + 1 rounds back to 256
        p.grad = torch.tensor([g], dtype=torch.bfloat16)
        opt.step()
    assert p.item() == -65.0


def test_order_skip_then_accumulate_drops_only_the_bad_micro_batch():
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    skip = skip_nonfinite()
    opt = Transformed(torch.optim.SGD([p], lr=1.0), skip, accumulate(2))
    for g in (1.0, math.nan, 3.0):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    assert skip.skips == 1 and p.item() == -2.0


# ---- checkpoints -------------------------------------------------------------------------------

def make_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = Transformed(oc.Adam(model.parameters(), lr=schedules.cosine(1e-2, 1e-3, 10)),
                      skip_nonfinite(), accumulate(3), clip_by_global_norm(0.1))
    return model, opt


def batches(n):
    g = torch.Generator().manual_seed(7)
    out = [(torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)) for _ in range(n)]
    out[4][0][0, 0] = math.nan
    return out


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_resume_mid_window_is_bit_exact():
    data = batches(14)
    model, opt = make_run()
    train(model, opt, data)
    model2, opt2 = make_run()
    # 8 batches, one of them skipped: two windows of 3 and one micro-batch of the third
    train(model2, opt2, data[:8])
    ckpt = roundtrip({"model": model2.state_dict(), "opt": opt2.state_dict()})
    assert ckpt["opt"]["transforms"][1]["count"] == 1 and ckpt["opt"]["transforms"][1]["buffers"]
    assert ckpt["opt"]["transforms"][0]["skips"] == 1
    model3, opt3 = make_run(seed=5)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    train(model3, opt3, data[8:])
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    assert opt3.transforms[0].skips == 1


def opt_fingerprint(opt):
    return (copy.deepcopy(opt.opt.state_dict()), opt.transforms[1].count,
            [t.clone() for t in opt.transforms[1]._buffers.values()], opt.transforms[0].skips)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("transforms"), "no transform state"),
    (lambda sd: sd["transforms"].pop(), r"transforms are \['skip_nonfinite', 'accumulate'\]"),
    (lambda sd: sd["transforms"][0].update(skips=-1), "'skips' must be an integer >= 0"),
    (lambda sd: sd["transforms"][1].update(count=5), "count 5, which is not below k=3"),
    (lambda sd: sd["transforms"][1].update(k=4), "window of k=4; this transform has k=3"),
    (lambda sd: sd["transforms"][1]["buffers"].update({0: torch.zeros(2)}), "has shape \\(2,\\)"),
    (lambda sd: sd["transforms"][1]["buffers"].update({9: torch.zeros(2)}), "parameter 9"),
    (lambda sd: sd["param_groups"].append({}), "parameter groups"),
])
def test_mismatched_checkpoints_are_refused_and_change_nothing(edit, match):
    data = batches(8)
    model, opt = make_run()
    train(model, opt, data[:5])
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    train(model, opt, data[5:7])  # the optimizer moves on; a refused load must not undo that
    before = opt_fingerprint(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt_fingerprint(opt)
    assert str(after[0]) == str(before[0]) and after[1:2] == before[1:2] and after[3] == before[3]
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))


def test_deepcopy_and_pickle_keep_the_buffers_with_their_parameters():
    model, opt = make_run()
    train(model, opt, batches(8)[:2])
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        params = [p for g in clone.param_groups for p in g["params"]]
        buffers = clone.transforms[1]._buffers
        assert len(buffers) == len(params) and all(any(p is b for b in buffers) for p in params)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make,error,match", [
    (lambda: clip_by_global_norm(0.0), ValueError, "max_norm must be > 0"),
    (lambda: clip_by_global_norm("1"), TypeError, "max_norm must be a real number"),
    (lambda: adaptive_clip(clipping=-1), ValueError, "clipping must be > 0"),
    (lambda: adaptive_clip(exclude=[1]), TypeError, "exclude must hold parameters"),
    (lambda: accumulate(0), ValueError, "k must be an integer >= 1"),
    (lambda: Transformed(torch.optim.SGD(leaves(2), lr=0.1), "clip"), TypeError,
     "every transform must be"),
    (lambda: Transformed(object(), skip_nonfinite()), TypeError, "wraps a torch.optim.Optimizer"),
])
def test_bad_arguments_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_fastai_api_and_hyperparameters_go_to_the_inner_optimizer():
    params = leaves((2, 2), (2,))
    opt = Transformed(oc.Adam([params[:1], params[1:]], lr=1e-3), clip_by_global_norm(1.0))
    opt.set_hyper("lr", slice(1e-4, 1e-2))
    assert [h["lr"] for h in opt.hypers] == pytest.approx([1e-4, 1e-2])
    torch_opt = Transformed(torch.optim.SGD(params, lr=0.1, momentum=0.9), skip_nonfinite())
    torch_opt.set_hyper("lr", 0.2)
    assert torch_opt.param_groups[0]["lr"] == 0.2
    assert isinstance(Transform(), Transform)
