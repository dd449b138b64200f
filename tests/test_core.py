"""The core's capabilities: the block specification, structural hyperparameters, routing, group
state, reductions over all parameters, the evaluation point, predicates on complex parameters.

References: torch.optim (SGD's momentum, AdamW), fastai's RMSProp formula written per element,
hand-computed sums.
"""
from __future__ import annotations

import io

import pytest
import torch

import optcraft as oc
from optcraft import engine
from optcraft.blocks import block, group, like_param, shaped, summed


def leaf(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_()


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def reload(opt_state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(opt_state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---- structural hyperparameters ----------------------------------------------------------------

def test_sgd_momentum_per_group_is_torchs():
    """The new user's case: momentum given per group, three unit-gradient steps."""
    w, v = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    ours = oc.SGD([{"params": [w], "momentum": 0.9}], lr=0.1)
    ref = torch.optim.SGD([{"params": [v], "momentum": 0.9}], lr=0.1)
    for _ in range(3):
        w.grad, v.grad = torch.ones(1), torch.ones(1)
        ours.step()
        ref.step()
    assert w.item() == pytest.approx(0.439) and torch.equal(w, v)


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused", "compiled"])
@pytest.mark.parametrize("how", ["set_hyper", "param_groups", "zero_then_nonzero", "cycled"])
def test_sgd_momentum_changed_later_is_torchs(how, impl, monkeypatch):
    """Momentum turned on after some steps (the buffer made then, equal to the gradient),
    turned off and on again (torch leaves the buffer as it was while momentum is 0), or cycled
    by OneCycleLR: the same numbers as torch.optim.SGD, on every path."""
    monkeypatch.setattr(oc.compiler_hints, "PER_TENSOR_MIN_NUMEL", 4)
    ps, qs = [leaf(3, 4), leaf(5, seed=1)], [leaf(3, 4), leaf(5, seed=1)]
    start = 0.9 if how == "cycled" else 0.0
    ours = oc.SGD([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.05}], lr=0.1, mom=start,
                  impl=impl)
    ref = torch.optim.SGD([{"params": qs[:1]}, {"params": qs[1:], "lr": 0.05}], lr=0.1,
                          momentum=start)
    if how == "cycled":
        scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.1, 0.05], total_steps=12,
                                                      cycle_momentum=True) for o in (ours, ref)]
    for i in range(12):
        for p, q, g in zip(ps, qs, grads_for(ps, i)):
            p.grad, q.grad = g.clone(), g.clone()
        if how == "set_hyper" and i == 3:
            ours.set_hyper("mom", 0.8)
            for grp in ref.param_groups:
                grp["momentum"] = 0.8
        if how == "param_groups" and i == 3:
            ours.param_groups[1]["momentum"] = 0.7
            ref.param_groups[1]["momentum"] = 0.7
        if how == "zero_then_nonzero" and i in (3, 6, 9):
            value = {3: 0.9, 6: 0.0, 9: 0.5}[i]
            for o in (ours, ref):
                for grp in o.param_groups:
                    grp["momentum"] = value
        ours.step()
        ref.step()
        if how == "cycled":
            for s in scheds:
                s.step()
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    if how == "zero_then_nonzero":
        torch.testing.assert_close(ours.state[ps[0]]["grad_avg"],
                                   ref.state[qs[0]]["momentum_buffer"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_rmsprop_momentum_given_later_follows_its_own_formula(impl):
    """RMSProp's momentum set per group or later is fastai's formula (momentum on the raw
    gradient, unlike torch's RMSprop): `sqr_avg <- a sqr_avg + (1 - a) g^2`, `m <- mom m + g`,
    `p <- p - lr m / (sqrt(sqr_avg) + eps)`, written here element by element."""
    p = leaf(2, 3)
    opt = oc.RMSProp([{"params": [p], "momentum": 0.0}], lr=0.01, sqr_mom=0.9)
    expected = p.detach().clone()
    sqr, mom_buf = torch.zeros_like(expected), None
    for i in range(8):
        g = grads_for([p], i)[0]
        p.grad = g.clone()
        mom = 0.0 if i < 3 else 0.8
        if i == 3:
            opt.set_hyper("mom", 0.8)
        opt.step()
        sqr = 0.9 * sqr + 0.1 * g * g
        if mom != 0:
            mom_buf = g.clone() if mom_buf is None else mom * mom_buf + g
        d = g if mom == 0 else mom_buf
        expected = expected - 0.01 * d / (sqr.sqrt() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_a_chain_choosing_argument_is_refused_per_group_and_later():
    p = leaf(3)
    with pytest.raises(ValueError, match="'decouple_wd' chooses SGD's chain .* cannot be given "
                                         "per group"):
        oc.SGD([{"params": [p], "decouple_wd": False}], lr=0.1)
    opt = oc.Adam([p], lr=0.1)
    with pytest.raises(ValueError, match="set_hyper: 'decouple_wd' chooses Adam's chain"):
        opt.set_hyper("decouple_wd", False)
    with pytest.raises(ValueError, match="'decouple_wd' chooses Adam's chain"):
        opt.add_param_group({"params": [leaf(2)], "decouple_wd": False})
    opt.param_groups[0]["decouple_wd"] = False  # written directly: refused at the step
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="'decouple_wd' chooses Adam's chain"):
        opt.step()
    assert torch.equal(p, before)
    with pytest.raises(ValueError, match="'clip' chooses Larc's chain"):
        oc.Larc([{"params": [p], "clip": False}], lr=0.1)


# ---- routing ------------------------------------------------------------------------------------

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)) \
        .double()


@pytest.mark.parametrize("where", ["predicate", "name"])
def test_routing_equals_one_torch_optimizer_per_part(where):
    """Matrices to SGD with momentum, the rest to AdamW: one optimizer with the numbers of
    torch.optim.SGD and torch.optim.AdamW run on the same two parts; a scheduler and `set_hyper`
    reach both parts; a checkpoint resumed mid-run continues exactly."""
    m, ref_m = model(), model()
    chooser = oc.by_ndim(2) if where == "predicate" else oc.by_name(m, "*.weight")

    def build(module):
        chooser_here = oc.by_ndim(2) if where == "predicate" else oc.by_name(module, "*.weight")
        return oc.route(module.named_parameters(),
                        oc.part(oc.SGD, where=chooser_here, lr=0.05, momentum=0.9),
                        oc.part(oc.Adam, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.1))
    opt = build(m)
    assert [g["chain"] for g in opt.param_groups] == ["sgd", "adam"]
    assert all(chooser(p) for p in opt.param_groups[0]["params"])
    matrices = [p for p in ref_m.parameters() if p.dim() == 2]
    rest = [p for p in ref_m.parameters() if p.dim() != 2]
    refs = [torch.optim.SGD(matrices, lr=0.05, momentum=0.9),
            torch.optim.AdamW(rest, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in [opt] + refs]
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def step(module, opts, i):
        for o in opts:
            o.zero_grad()
        module(x * (i + 1)).pow(2).mean().backward()
        for o in opts:
            o.step()
    for i in range(10):
        step(m, [opt], i)
        step(ref_m, refs, i)
        for s in scheds:
            s.step()
        if i == 4:
            saved = reload(opt.state_dict()), {k: v.clone() for k, v in m.state_dict().items()}
            opt.set_hyper("lr", [0.02, 0.004])
            for o, lr in zip(refs, [0.02, 0.004]):
                o.param_groups[0]["lr"] = lr
    for a, b in zip(m.parameters(), ref_m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # resumed at step 5 from the checkpoint: the uninterrupted run's numbers
    resumed_m = model()
    resumed_m.load_state_dict(saved[1])
    resumed = build(resumed_m)
    resumed.load_state_dict(saved[0])
    assert [g["chain"] for g in resumed.param_groups] == ["sgd", "adam"]
    sched = torch.optim.lr_scheduler.StepLR(resumed, step_size=3, gamma=0.5, last_epoch=4)
    resumed.set_hyper("lr", [0.02, 0.004])
    for i in range(5, 10):
        step(resumed_m, [resumed], i)
        sched.step()
    for a, b in zip(resumed_m.parameters(), m.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_routing_refuses_a_parameter_no_part_takes():
    with pytest.raises(ValueError, match="goes to no part"):
        oc.route(model().named_parameters(), oc.part(oc.SGD, where=oc.by_ndim(2), lr=0.1))


# ---- the block specification --------------------------------------------------------------------

rows = shaped(lambda s: s[:-1] if len(s) >= 2 else None, "row means of g^2")
cols = shaped(lambda s: s[:-2] + s[-1:] if len(s) >= 2 else None, "column means of g^2")


@block(hypers=dict(sqr_mom=0.9), state=dict(row_avg=rows, col_avg=cols))
def factored_sqr(p, sqr_mom, row_avg=None, col_avg=None, **kwargs):
    """Row and column means of g^2 (Adafactor's factored second moment), per matrix."""
    if row_avg is None:
        row_avg = p.grad.map(lambda g: torch.zeros(g.shape[:-1], dtype=g.dtype))
        col_avg = p.grad.map(lambda g: torch.zeros(g.shape[:-2] + g.shape[-1:], dtype=g.dtype))
    row_avg.lerp_(p.grad.map(lambda g: (g * g).mean(-1)), 1 - sqr_mom)
    col_avg.lerp_(p.grad.map(lambda g: (g * g).mean(-2)), 1 - sqr_mom)
    return {"row_avg": row_avg, "col_avg": col_avg}


def test_factored_state_loads_from_its_own_checkpoint_and_is_checked():
    p = leaf(4, 3)
    opt = oc.Optimizer([p], [factored_sqr, oc.sgd_step], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = reload(opt.state_dict())
    assert sd["state"][0]["row_avg"].shape == (4,) and sd["state"][0]["col_avg"].shape == (3,)
    fresh = oc.Optimizer([p], [factored_sqr, oc.sgd_step], lr=0.1)
    fresh.load_state_dict(sd)
    sd["state"][0]["row_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'row_avg' .* shape \(3,\), expected \(4,\) \(row means"):
        fresh.load_state_dict(sd)
    # memory accounting reads the rules: 4 + 3 numbers for 12 parameters, float64
    assert fresh.chain.state_bytes(p) == 7 * 8


def test_the_seeds_one_tensor_call_keeps_factored_state_across_steps():
    """Called on a plain tensor, a block wraps its declared state whatever its shape (the old
    rule wrapped only tensors of the parameter's shape, and broke at the second step)."""
    p = leaf(4, 3)
    p.grad = torch.ones_like(p)
    state = factored_sqr(p, sqr_mom=0.5)
    state = factored_sqr(p, sqr_mom=0.5, **state)
    torch.testing.assert_close(state["row_avg"], torch.full((4,), 0.75, dtype=torch.float64))


def test_a_block_is_checked_when_it_is_defined():
    with pytest.raises(TypeError, match="state must be a dict"):
        block(lambda p, **kw: None, state=("grad_avg",))
    with pytest.raises(TypeError, match="reads must be one of"):
        block(lambda p, **kw: None, reads="everything")
    with pytest.raises(TypeError, match="declares hyperparameter 'mom' but does not take it"):
        block(lambda p, **kw: None, hypers=dict(mom=0.9))
    with pytest.raises(TypeError, match="must take \\*\\*kwargs"):
        block(lambda p, mom: None, hypers=dict(mom=0.9))
    with pytest.raises(TypeError, match="static and switches must be tuples"):
        block(lambda p, beta=0, **kw: None, static="beta")
    with pytest.raises(TypeError, match="reads='numbers' .* keeps tensor state"):
        block(lambda p, **kw: None, state=dict(buf=like_param), reads="numbers")


# ---- group state and reductions over all parameters --------------------------------------------

@block(state=dict(sq=summed))
def grad_square_sum(p, **kwargs):
    """Every gradient's sum of squares, to be summed over all parameters."""
    return {"sq": p.grad.map(lambda g: (g * g).sum())}


@block(state=dict(total=group(0.0), steps=group(0)), reads="all")
def accumulate_total(p, sq, total=0.0, steps=0, **kwargs):
    """Once per group: the running total of every parameter's squared gradients."""
    return {"total": total + sq, "steps": steps + 1}


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_a_sum_over_all_parameters_reaches_every_group_and_group_state_round_trips(impl):
    params = [leaf(3, 2), leaf(4, seed=1), leaf(2, seed=2)]
    chain = [grad_square_sum, accumulate_total, oc.sgd_step]
    opt = oc.Optimizer([params[:2], params[2:]], chain, lr=0.0, impl=impl)
    expected = 0.0
    for i in range(3):
        grads = grads_for(params, i)
        for p, g in zip(params, grads):
            p.grad = g
        params[1].grad = None if i == 1 else params[1].grad  # a parameter without a gradient
        opt.step()
        expected += sum(float((p.grad * p.grad).sum()) for p in params if p.grad is not None)
        for grp in opt.param_groups:
            assert float(grp["group_state"]["total"]) == pytest.approx(expected, rel=1e-12)
            assert grp["group_state"]["steps"] == i + 1
    assert "total" not in opt.hypers[0]  # group state is not a hyperparameter
    sd = reload(opt.state_dict())
    fresh = oc.Optimizer([params[:2], params[2:]], chain, lr=0.0, impl=impl)
    fresh.load_state_dict(sd)
    assert [g["group_state"]["steps"] for g in fresh.param_groups] == [3, 3]
    torch.testing.assert_close(torch.as_tensor(fresh.param_groups[1]["group_state"]["total"]),
                               torch.as_tensor(expected, dtype=torch.float64))


def test_schedule_progress_travels_in_the_param_groups():
    """With a schedule, the step count schedules see is saved in each group's own state too, so
    a checkpoint that keeps only `state` and `param_groups` (ZeRO's consolidated one, DCP's)
    resumes the schedule where it was."""
    p = leaf(3)
    opt = oc.Adam([p], lr=oc.schedules.linear(0.1, 0.0, 10))
    for _ in range(4):
        p.grad = torch.ones_like(p)
        opt.step()
    sd = reload(opt.state_dict())
    del sd["schedule_step"]
    fresh = oc.Adam([p], lr=oc.schedules.linear(0.1, 0.0, 10))
    fresh.load_state_dict(sd)
    assert fresh.schedule_step == 4


# ---- the evaluation point -----------------------------------------------------------------------

def _to_eval(p, offset, **kwargs):
    p.add_(offset)


def _to_train(p, offset, **kwargs):
    p.sub_(offset)


@block(state=dict(offset=like_param), eval_point=(_to_eval, _to_train))
def shifted_eval(p, offset=None, **kwargs):
    """A toy evaluation point: the model is evaluated at `p + offset`, offset = the last
    gradient."""
    return {"offset": p.grad.clone()}


def test_train_and_eval_move_the_parameters_and_a_step_in_eval_mode_is_refused():
    p = leaf(3)
    opt = oc.Optimizer([p], [shifted_eval, oc.sgd_step], lr=0.1)
    opt.eval()  # before any step: nothing to move
    opt.train()
    p.grad = torch.ones_like(p)
    opt.step()
    trained = p.detach().clone()
    opt.eval()
    torch.testing.assert_close(p.detach(), trained + 1)
    sd = reload(opt.state_dict())
    assert sd["param_groups"][0]["group_state"]["train_mode"] is False
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    torch.testing.assert_close(p.detach(), trained)
    opt.train()  # twice: no second move
    torch.testing.assert_close(p.detach(), trained)


# ---- predicates see the parameter as it was made ------------------------------------------------

def test_predicates_see_a_complex_matrix_as_a_matrix():
    w = torch.randn(4, 3, dtype=torch.complex128, requires_grad=True)
    real = torch.view_as_real(w)
    assert oc.by_ndim(2)(real) and not oc.conv_weight(real)
    conv = torch.randn(2, 3, 3, 3, dtype=torch.complex64, requires_grad=True)
    assert oc.conv_weight(torch.view_as_real(conv))
    # AdamGC leaves the complex matrix uncentred: Adam's numbers
    a, b = w.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gc, adam = oc.AdamGC([a], lr=0.01), oc.Optimizer(
        [b], oc.AdamGC([leaf(1)], lr=0.01).cbs[1:], lr=0.01, mom=0.9, sqr_mom=0.99, eps=1e-8)
    for i in range(3):
        g = torch.randn(4, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = g.clone(), g.clone()
        gc.step()
        adam.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_engine_paths_share_one_interface():
    chain = engine.Chain([oc.sgd_step])
    for name, cls in engine.PATHS.items():
        if name == "fused":
            continue  # (needs a chain torch has a kernel for)
        path = cls(chain)
        assert path.name == name and isinstance(path, engine.Path)
    assert engine.path_for("auto", engine.Chain(oc.SGD([leaf(2)], lr=0.1).cbs)).name == "fused"
