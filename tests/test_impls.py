"""Every execution path gives the reference path's numbers.

The reference path (one parameter at a time) is itself checked against torch.optim and per-element
formulas in test_against_references.py; here every other path must match it to 1e-6 relative in
float64, over 20 steps, two groups, gradients missing on some steps and a parameter whose state
says `do_wd=False`.
"""
from __future__ import annotations

import io
import warnings

import pytest
import torch

import optcraft as oc
from optcraft import compiler_hints, engine, schedules, tensorlist
from optcraft.blocks.base import callback_name
from optcraft.engine import chain as engine_chain, compiled
from optcraft.tensorlist import TensorList

OPTIMIZERS = {
    "SGD": lambda ps, impl: oc.SGD(ps, lr=0.05, wd=0.1, impl=impl),
    "SGD-momentum": lambda ps, impl: oc.SGD(ps, lr=0.05, mom=0.9, wd=0.1, impl=impl),
    "SGD-momentum-l2": lambda ps, impl: oc.SGD(ps, lr=0.05, mom=0.9, wd=0.1, decouple_wd=False,
                                                impl=impl),
    "SGD-nesterov": lambda ps, impl: oc.optax.sgd(ps, 0.05, momentum=0.9, nesterov=True,
                                                  impl=impl),
    "RMSProp": lambda ps, impl: oc.RMSProp(ps, lr=0.01, mom=0.9, wd=0.1, impl=impl),
    "Adam": lambda ps, impl: oc.Adam(ps, lr=0.01, wd=0.1, impl=impl),
    "Adam-l2": lambda ps, impl: oc.Adam(ps, lr=0.01, wd=0.1, decouple_wd=False, impl=impl),
    "RAdam": lambda ps, impl: oc.RAdam(ps, lr=0.01, wd=0.1, impl=impl),
    "SAdam-beta": lambda ps, impl: oc.RAdam(ps, lr=0.01, beta=5.0, impl=impl),
    "QHAdam": lambda ps, impl: oc.QHAdam(ps, lr=0.01, wd=0.1, impl=impl),
    "Larc": lambda ps, impl: oc.Larc(ps, lr=0.1, wd=0.1, impl=impl),
    "Lars": lambda ps, impl: oc.Larc(ps, lr=0.1, clip=False, impl=impl),
    "Lamb": lambda ps, impl: oc.Lamb(ps, lr=0.01, wd=0.1, impl=impl),
    "lamb_step-alone": lambda ps, impl: oc.Optimizer(
        ps, [oc.weight_decay, oc.average_grad, oc.average_sqr_grad, oc.step_stat, oc.lamb_step],
        lr=0.01, wd=0.1, impl=impl),
    "ranger": lambda ps, impl: oc.ranger(ps, lr=0.01, k=3, impl=impl),
}
FUSABLE = {"SGD", "SGD-momentum", "SGD-momentum-l2", "SGD-nesterov", "Adam", "Adam-l2"}


def make_params():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 4, 2), (7,), ()]
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def train(name, impl, steps=20):
    params = make_params()
    opt = OPTIMIZERS[name]([params[:3], params[3:]], impl)
    opt.state[params[1]]["do_wd"] = False
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        for j, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad = None if (i + j) % 4 == 0 else grad
        opt.step()
    return params, opt


def assert_same_run(a, b):
    (params, opt), (ref_params, ref_opt) = a, b
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-10)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for k, v in ref_opt.state[q].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(opt.state[p][k], v, rtol=1e-6, atol=1e-10)
            else:
                assert opt.state[p][k] == v, k


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("impl", ["foreach", "auto", "fused"])
def test_eager_paths_give_the_reference_numbers(name, impl):
    if impl == "fused" and name not in FUSABLE:
        with pytest.raises(ValueError, match="no fused kernel for the chain"):
            OPTIMIZERS[name](make_params(), impl)
        return
    assert_same_run(train(name, impl), train(name, "reference"))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sliced_blocks_give_the_reference_numbers(name, monkeypatch):
    """Elementwise blocks run on slices of 7 elements (GPT-2's tensors get slices of 2**20): the
    slices cross tensor boundaries in a batch, the 0-d parameter rides with the others."""
    monkeypatch.setattr(engine.ForeachPath, "slice_numel", 7)
    calls = []
    monkeypatch.setattr(engine_chain, "run_sliced",
                        lambda *a, real=engine_chain.run_sliced: (calls.append(1), real(*a))[1])
    assert_same_run(train(name, "foreach"), train(name, "reference"))
    if name not in ("Larc", "Lars", "Lamb"):
        assert calls  # (chains of per-tensor norms are not sliced)


def test_sliced_blocks_on_master_weights_and_complex_parameters(monkeypatch):
    """bfloat16 parameters step on float32 master copies and complex ones as real views: both
    run on slices like any other, with the reference path's numbers."""
    monkeypatch.setattr(engine.ForeachPath, "slice_numel", 7)

    def run(impl):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(6, 5, generator=g).to(torch.bfloat16).requires_grad_(),
                  torch.randn(4, 3, dtype=torch.complex64, generator=g).requires_grad_()]
        opt = oc.Adam(params, lr=0.01, wd=0.1, impl=impl)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g) if p.is_complex() \
                    else torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
        return params, opt
    calls = []
    monkeypatch.setattr(engine_chain, "run_sliced",
                        lambda *a, real=engine_chain.run_sliced: (calls.append(1), real(*a))[1])
    (params, opt), (ref, _) = run("foreach"), run("reference")
    assert calls
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q)  # (torch's tolerances for bfloat16 and complex64)


def test_what_runs_on_slices(monkeypatch):
    """Only a block that reads elements, on plain contiguous tensors with its state already
    there, with no per-parameter values from a plain callback; and only where a tensor is larger
    than a slice."""
    from optcraft.blocks import PerParam, average_sqr_grad, l2_reg

    def bucket(*shapes, transpose=False):
        ts = [torch.ones(s) for s in shapes]
        if transpose:
            ts[0] = ts[0].t()
        return tensorlist.ParamList(ts, [torch.ones_like(t) for t in ts])
    params = bucket((4, 5), (3,))
    state = {"sqr_avg": TensorList([torch.zeros(4, 5), torch.zeros(3)])}
    hyper = {"sqr_mom": 0.9}
    assert engine_chain.sliceable(average_sqr_grad, params, state, hyper)
    assert not engine_chain.sliceable(l2_reg, params, state, hyper)  # replaces the gradient
    assert not engine_chain.sliceable(average_sqr_grad, params, {}, hyper)  # state not made yet
    assert not engine_chain.sliceable(average_sqr_grad, bucket((5, 4), (3,), transpose=True),
                                      state, hyper)
    assert not engine_chain.sliceable(average_sqr_grad, params,
                                      {**state, "tag": PerParam([1, 2])}, hyper)
    # nothing larger than a slice: the chain runs whole, no block is asked
    calls = []
    real = engine_chain.sliceable
    monkeypatch.setattr(engine_chain, "sliceable", lambda *a: calls.append(1) or real(*a))
    engine_chain.apply([average_sqr_grad], params, state, hyper, slice_numel=20)
    assert not calls
    engine_chain.apply([average_sqr_grad], params, state, hyper, slice_numel=7)
    assert calls


def test_a_block_misdeclared_elementwise_is_refused(monkeypatch):
    """A block that returns new state tensors cannot run on slices: the engine says so rather
    than keep slices as state."""
    monkeypatch.setattr(engine.ForeachPath, "slice_numel", 7)

    @oc.block(state=dict(buf=oc.blocks.like_param), reads="elements")
    def copying(p, buf=None, **kwargs):
        return {"buf": p.grad.clone() if buf is None else buf.add(p.grad)}
    params = make_params()
    opt = oc.Optimizer(params, [copying, oc.sgd_step], lr=0.1, impl="foreach")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # creates the state: whole tensors
    with pytest.raises(RuntimeError, match="declared to read elements but .* new state tensors"):
        opt.step()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_path_gives_the_reference_numbers(name, monkeypatch):
    # Parameters of 10 elements or more are compiled, smaller ones run on the foreach path (the
    # split that big models get at 65536 elements).
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)
    params, opt = train(name, "compiled")
    assert_same_run((params, opt), train(name, "reference"))
    # each kind of piece was traced once: what a step leaves for the next (its state) has the
    # signature the graph was traced for
    functions = getattr(opt, "opt", opt).path.functions
    assert functions and all(len(fn.graphs) == 1 for fn in functions.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Adam", "Lamb"])
def test_compiled_path_on_a_torch_without_standalone_compile(name, monkeypatch):
    """Where torch has no `torch._inductor.standalone_compile`, the traced graphs (Lamb's in two
    parts) go through `torch.compile`: the same numbers."""
    import torch._inductor
    monkeypatch.delattr(torch._inductor, "standalone_compile")
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)
    calls = []
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert_same_run(train(name, "compiled"), train(name, "reference"))
    assert calls


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_auto_is_fused_exactly_for_torchs_kernels(name):
    opt = OPTIMIZERS[name](make_params(), "auto")
    inner = getattr(opt, "opt", opt)
    assert engine.resolve("auto", inner.chain) == ("fused" if name in FUSABLE else "foreach")


def test_fused_runs_torchs_kernel(monkeypatch):
    """auto Adam goes through torch._fused_adamw_ (not a foreach chain that happens to agree)."""
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(1), kernel(*a, **k)))
    train("Adam", "auto", steps=3)
    assert calls


def test_fused_leaves_non_contiguous_parameters_to_foreach():
    """torch's kernels pair elements by memory order: a transposed parameter (or a gradient with
    other strides) must not be fed to them."""
    def run(impl):
        base = torch.arange(12, dtype=torch.float64).reshape(4, 3)
        p = base.t().detach().requires_grad_()  # shape (3, 4), strides (1, 3): not contiguous
        assert not p.is_contiguous()
        opt = oc.Adam([p], lr=0.1, impl=impl)
        for i in range(3):
            p.grad = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4) * (i + 1)
            opt.step()
        return p
    torch.testing.assert_close(run("fused"), run("reference"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("first,second", [("fused", "foreach"), ("foreach", "fused"),
                                          ("reference", "fused")])
def test_checkpoints_move_between_paths(first, second):
    """The fused path keeps optcraft's state names, so a checkpoint written by one path resumes
    on another with the uninterrupted run's numbers."""
    ref_params, _ = train("Adam", "reference", steps=8)
    params = make_params()
    opt = oc.Adam([params[:3], params[3:]], lr=0.01, wd=0.1, impl=first)
    opt.state[params[1]]["do_wd"] = False
    g = torch.Generator().manual_seed(1)

    def steps(opt, params, rng):
        for i in rng:
            for j, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
                p.grad = None if (i + j) % 4 == 0 else grad
            opt.step()
    steps(opt, params, range(4))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = oc.Adam([params[:3], params[3:]], lr=0.01, wd=0.1, impl=second)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    steps(resumed, params, range(4, 8))
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-10)


def test_foreach_buckets_stay_below_the_largest_parameter():
    """The eager foreach path splits a group into buckets no bigger than its largest parameter
    (or foreach.MIN_CHUNK_NUMEL), so a block's temporaries never span the whole model."""
    big = engine.foreach.MIN_CHUNK_NUMEL
    params = [torch.zeros(big // 2, requires_grad=True) for _ in range(5)] + \
        [torch.zeros(big, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    buckets = engine.ForeachPath(engine.Chain([oc.sgd_step])).buckets(params, {})
    assert [len(b.params) for b in buckets] == [2, 2, 1, 1]
    assert max(sum(p.numel() for p in b.params) for b in buckets) <= big


@pytest.mark.slow
def test_compiled_never_recompiles_while_schedules_change_lr_and_mom(monkeypatch):
    """Hyperparameters enter the graph as tensors: 200 steps with lr and mom changing every step
    compile once per kind of bucket and never again."""
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 1)  # compile every tensor

    def run(impl):
        params = make_params()
        opt = oc.Lamb([params[:3], params[3:]], lr=schedules.cosine(1e-2, 1e-4, 200),
                      mom=schedules.linear(0.95, 0.85, 200), impl=impl)
        g = torch.Generator().manual_seed(1)

        def step():
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        for _ in range(3):  # steps 1 and 2 meet new kinds of bucket (no state, then state): eager
            step()
        lrs = set()
        compiles = opt.path.compiles if impl == "compiled" else None
        for _ in range(197):
            step()
            lrs.add(opt.param_groups[0]["lr"])
        if impl == "compiled":
            assert compiles > 0 and opt.path.compiles == compiles
        assert len(lrs) == 197
        assert opt.param_groups[0]["mom"] == pytest.approx(0.85, abs=1e-3)
        return params, opt
    params, opt = run("compiled")
    # and every scheduled value reached the graph (the 0-d inputs are refilled when they change)
    assert_same_run((params, opt), run("reference"))


@pytest.mark.slow
def test_compiled_traces_each_kind_of_piece_once(monkeypatch):
    """The state a step leaves has the signature its graph was traced for: BAdam's per-tensor
    scalars, views of one vector after the eager first step, are separate tensors after a
    compiled one, and that is no new signature (a piece of four tensors of one shape)."""
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(8, 16, generator=g).requires_grad_() for _ in range(4)]
    opt = oc.BAdam(params, lr=0.01, impl="compiled")
    for _ in range(6):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    (function,) = opt.path.functions.values()
    assert len(function.graphs) == 1 and function.compiles == 1


@pytest.mark.slow
@pytest.mark.parametrize("form", ["item", "branch", "tensor"])
def test_compiled_runs_eagerly_a_chain_that_reads_tensor_values(form, monkeypatch):
    """A plain callback whose Python needs a tensor's value (`alpha=-lr` with `lr` a 0-d tensor,
    as the compiled path passes it; an `if` on a tensor) cannot be one graph: the compiled path
    says so in a warning naming the shapes, runs those pieces on the foreach path, and gives the
    reference path's numbers; a callback written with tensor operations compiles."""
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 1)

    def reads_a_number(p, lr, **kwargs):
        p.data.add_(p.grad, alpha=-lr)

    def branches(p, lr, **kwargs):
        if p.grad.sum() > 0:
            p.data.sub_(p.grad * lr)
        else:
            p.data.sub_(p.grad * (2 * lr))

    def with_tensors(p, lr, **kwargs):
        p.data.sub_(p.grad * lr)

    def run(impl):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()
                  for _ in range(2)]
        cb = {"item": reads_a_number, "branch": branches, "tensor": with_tensors}[form]
        opt = oc.Optimizer(params, [cb], lr=0.1, impl=impl)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        return params, opt
    if form == "tensor":
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*runs this chain eagerly")
            params, opt = run("compiled")
        assert opt.path.compiles and not opt.path.untraceable
    else:
        with pytest.warns(UserWarning, match=r"runs this chain eagerly .*\(4, 3\)"):
            params, opt = run("compiled")
        assert opt.path.untraceable
    for p, q in zip(params, run("reference")[0]):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)


def test_compiled_pieces_group_large_tensors_by_shape():
    """The compiled path compiles tensors of PER_TENSOR_MIN_NUMEL elements or more, by shape, at
    most CHUNK_TENSORS to a graph (repeated layers share one compiled function); smaller tensors
    run on the foreach path, in pieces no bigger than that path's buckets."""
    big = compiler_hints.PER_TENSOR_MIN_NUMEL
    path = engine.CompiledPath(engine.Chain([oc.sgd_step]))
    shapes = [(big,), (3,), (2, big), (big,), (5,), (big,), (big,), (big,), (2, big)]
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.ones_like(p)
    pieces = path.buckets(params, {})
    assert compiled.CHUNK_TENSORS == 4
    index = {id(p): i for i, p in enumerate(params)}
    assert [[index[id(p)] for p in piece.params] for piece in pieces] == \
        [[1, 4], [0, 3, 5, 6], [7], [2, 8]]
    for piece in pieces:
        assert [id(g) for g in piece.grads] == [id(p.grad) for p in piece.params]
    # small tensors in chunks no bigger than the foreach path's
    many = [torch.zeros(big - 1, requires_grad=True) for _ in range(40)]
    for p in many:
        p.grad = torch.ones_like(p)
    sizes = [sum(p.numel() for p in piece.params) for piece in path.buckets(many, {})]
    assert sum(sizes) == 40 * (big - 1) and max(sizes) <= engine.foreach.MIN_CHUNK_NUMEL < 40 * big


@pytest.mark.slow
def test_compiled_compiles_nothing_until_the_state_exists(monkeypatch):
    """A step that meets a kind of piece without its state runs every such piece eagerly (it
    creates the state; a graph traced then would be used once); with all the state the chain's
    blocks declare, the kind compiles at once: with two pieces of one shape, nothing is compiled
    at step 1 and one function at step 2, for both.  A chain that declares no state (a plain
    callback may still make some) compiles a kind from the step after the one that met it."""
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 1)
    monkeypatch.setattr(compiled, "CHUNK_TENSORS", 1)

    def compiled_after_each_step(make, steps=3):
        params = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        opt = make(params)
        counts = []
        for _ in range(steps):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            counts.append(len(opt.path.functions))
        return counts
    assert compiled_after_each_step(lambda ps: oc.Lamb(ps, lr=0.01, impl="compiled")) == \
        [0, 1, 1]

    def plain_sgd_step(p, lr, **kwargs):
        p.data.sub_(p.grad * lr)
    assert compiled_after_each_step(
        lambda ps: oc.Optimizer(ps, [plain_sgd_step], lr=0.1, impl="compiled")) == [0, 1, 1]
    sgd = [oc.sgd_step]  # a block, no state declared: compiled from step 2 as well
    assert compiled_after_each_step(
        lambda ps: oc.Optimizer(ps, sgd, lr=0.1, impl="compiled")) == [0, 1, 1]


@pytest.mark.slow
def test_compiled_step_reads_nothing_back_from_its_graphs(monkeypatch):
    """The step count is a host block's: the compiled path counts it in Python and hands it to the
    graph, so a step reads no number back from the device (on a GPU, `.item()` would wait for the
    piece's kernels), and the count is the same Python int the eager paths keep."""
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 1)

    def run(impl, patch_last=False):
        params, opt = train("Adam", impl, steps=4)
        for i in range(5):  # all gradients: new kinds of piece, compiled from the next step
            for p in params:
                p.grad = torch.ones_like(p)
            with monkeypatch.context() as patch:
                if patch_last and i == 4:
                    assert opt.path.functions
                    patch.setattr(compiled, "_read_back", lambda *a, **k: pytest.fail("read"))
                opt.step()
        return params, opt
    params, opt = run("compiled", patch_last=True)
    assert_same_run((params, opt), run("reference"))
    assert all(type(opt.state[p]["step"]) is int for p in params)


def test_compiled_leaves_small_tensors_to_foreach(monkeypatch):
    """A bucket of small tensors never reaches torch.compile."""
    monkeypatch.setattr(compiled, "_inductor_compile",
                        lambda *a, **k: pytest.fail("compiled a small bucket"))
    params, opt = train("Lamb", "compiled", steps=4)
    assert not opt.path.functions


@pytest.mark.parametrize("shape", [(64, 96), (3, 4096), (5000,), (4099,), (96, 64, 2)])
@pytest.mark.parametrize("ord", [2, 1, float("inf"), 0.5])
def test_blocked_norm_is_the_norm(shape, ord):
    """The compiled path's norm of a large tensor (norms of rows, then their norm) is the norm:
    rows of 3072, 4096 and 2500 elements, no row length (4099 is prime), a non-contiguous view."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if len(shape) == 3:
        t = t.transpose(0, 1)
    expected = torch.linalg.vector_norm(t, ord)
    torch.testing.assert_close(compiler_hints.blocked_norm(t, ord), expected, rtol=1e-12, atol=0)


def test_eager_lamb_computes_its_update_once(monkeypatch):
    """Eagerly `lamb_trust_ratio` hands its update to `lamb_step`, which does not compute it
    again (one parameter-sized direction per bucket and step)."""
    from optcraft.blocks import layerwise
    calls = []
    original = layerwise.lamb_direction
    monkeypatch.setattr(layerwise, "lamb_direction",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    params = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    opt = oc.Lamb(params, lr=0.01, impl="foreach")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(calls) == 1


def test_compiled_path_runs_lamb_trust_ratio_in_its_own_form_and_cuts_after_it():
    """The compiled path runs LAMB's trust ratio in a form of its own (the ratio alone handed on,
    its moments read as stored) and, on a CPU, cuts the graph after it unless it is the last
    block; on a GPU the chain is traced whole."""
    lamb = oc.Lamb([torch.zeros(2, requires_grad=True)], lr=0.1).cbs
    names = lambda cbs: [callback_name(cb) for cb in cbs]  # noqa: E731
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    on = engine.CompiledPath.chain_on
    assert names(on(lamb, cpu)) == names(lamb[:4]) + ["lamb_trust_ratio_stored", "cut",
                                                      "lamb_step"]
    assert names(on(lamb[:-1], cpu)) == names(lamb[:4]) + ["lamb_trust_ratio_stored"]
    sgd = [oc.average_grad, oc.sgd_step]
    assert on(sgd, cpu) == sgd
    one, two = oc.blocks.lamb_blocks(norm="l2")
    assert names(on([one, one, two], cpu)) == [
        "lamb_trust_ratio_stored(norm='l2')", "cut", "lamb_trust_ratio_stored(norm='l2')", "cut",
        "lamb_step(norm='l2')"]
    assert names(on(lamb, gpu)) == names(lamb[:4]) + ["lamb_trust_ratio_stored", "lamb_step"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AdamGC", "StableAdam", "AdamAWD"])
def test_compiled_per_channel_blocks_give_the_reference_numbers(name, monkeypatch):
    """The research blocks that reduce per output channel of a convolution weight and then use
    the result end the graph between the two (`research._end_graph`): one graph holding both
    fails in torch 2.13's CPU code generation (a KeyError), even for a weight of 8x4x3x3.
    Compiled, the step is cut there, and gives the reference path's numbers over 10 steps."""
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)
    make = {"AdamGC": oc.AdamGC, "StableAdam": oc.StableAdam, "AdamAWD": oc.AdamAWD}[name]

    def run(impl):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_()
                  for s in [(8, 4, 3, 3), (8, 4, 3, 3), (6, 5)]]
        opt = make(params, lr=0.01, impl=impl)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        return params, opt
    a, b = run("compiled"), run("reference")
    assert_same_run(a, b)
    chain = a[1].path
    graphs = [graph for fn in chain.functions.values() for graph in fn.graphs.values()]
    assert {graph.parts for graph in graphs} == {1, 2}  # the conv weights cut; (6, 5) not


@pytest.mark.slow
@pytest.mark.parametrize("chain", ["Lamb", "lamb_step-alone"])
def test_compiled_lamb_on_large_tensors_gives_the_reference_numbers(chain, monkeypatch):
    """Parameters large enough for `_blocked_norm`'s rows (6,144 elements: rows of 3,072), with
    scalars made buffers (`_realized`), compiled: the reference path's numbers over 10 steps.
    Lamb runs in two graphs, its trust ratio's norms flat and the moments read as stored; its
    `lamb_step` alone in one graph, with the norms over rows."""
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)

    def run(impl):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_()
                  for s in [(64, 96), (64, 96), (7,)]]
        opt = OPTIMIZERS[chain](params, impl)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        return params, opt
    (params, opt), (ref_params, ref_opt) = run("compiled"), run("reference")
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-10)
        for k, v in ref_opt.state[q].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(opt.state[p][k], v, rtol=1e-6, atol=1e-10)
    (function,) = opt.path.functions.values()  # one kind of piece, compiled
    (graph,) = function.graphs.values()
    assert graph.parts == (2 if chain == "Lamb" else 1)
