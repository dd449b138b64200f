"""optcraft's optimizers under `torch.compile`, as PyTorch users compile them: the documented
recipe (`@torch.compile def fn(): opt.step()`, also with `fullgraph=True`) and a compiled training
step (forward, backward, `opt.step()`, `zero_grad`), with a tensor lr under a torch LR scheduler
and `set_hyper`, against the same optimizer run eagerly.

Under dynamo a step is one operation of the graph, `optcraft::step`, which runs the step as it
runs eagerly (see docs/integration.md, "torch.compile"); a cold compile costs tens of seconds on
a small CPU, so the inductor tests are few and small, and the sweep over every optimizer and path
uses dynamo's "eager" backend (the same tracing, no code generation).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from optcraft import compiler_hints, registry

pytestmark = pytest.mark.slow

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles afresh: its functions share their code with the other tests', and
    dynamo stops compiling a code object after `cache_size_limit` versions."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _pair(name, impl, scheduled=True):
    """An optimizer and its eager twin on equal models, each under a StepLR (or none) on a tensor
    lr."""
    made = []
    for _ in range(2):
        model = _model()
        entry = registry.get(name)
        try:
            opt = entry.make(model.parameters(), lr=torch.tensor(entry.lr / 10), impl=impl)
        except ValueError as error:
            assert impl == "fused" and "no fused kernel" in str(error)
            pytest.skip(f"{name} has no fused kernel")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7) if scheduled \
            else None
        made.append((model, opt, sched))
    return made


def _run(name, impl, backend, whole_step, steps, python_lr=False, fullgraph=False):
    """Steps of a compiled training step, or of the recipe (`fullgraph`: without a scheduler,
    whose wrapper of `opt.step` dynamo does not trace, for torch's optimizers as for ours),
    against the eager ones; the number of frames compiled after the tenth step."""
    (model, opt, sched), (ref_model, ref_opt, ref_sched) = _pair(name, impl, not fullgraph)
    counter = CompileCounterWithBackend(backend)
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(32, 1)

    def train_step(model, opt):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    if whole_step:
        compiled = torch.compile(train_step, backend=counter)
    else:
        @torch.compile(fullgraph=fullgraph, backend=counter)
        def compiled_step(model, opt):
            opt.step()

        def compiled(model, opt):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            compiled_step(model, opt)
            opt.zero_grad()

    warm = None
    for i in range(steps):
        compiled(model, opt)
        train_step(ref_model, ref_opt)
        for s in (sched, ref_sched):
            if s is not None:
                s.step()
        if i == steps // 2:  # a new value, as torch documents it for compiled optimizers
            new = entry_lr(name) / 20
            for o in (opt, ref_opt):
                o.set_hyper("lr", new if python_lr else torch.tensor(new))
        if i == 9:
            warm = counter.frame_count
    torch.testing.assert_close(list(model.parameters()), list(ref_model.parameters()),
                               rtol=1e-5, atol=1e-5)
    assert warm > 0  # (dynamo compiled the step: it did not fall back to running it eagerly)
    return counter.frame_count - warm


def entry_lr(name):
    return registry.get(name).lr


@pytest.mark.parametrize("impl", ["reference", "foreach", "auto", "fused", "compiled"])
@pytest.mark.parametrize("name", registry.names())
def test_every_optimizer_compiles_on_every_path(name, impl):
    """The documented recipe, every named optimizer on every path (dynamo's eager backend): the
    eager numbers, and no compiling after the first steps over 24 steps of a StepLR and a
    `set_hyper`; 100 steps with inductor below."""
    assert _run(name, impl, "eager", whole_step=False, steps=24) == 0


@pytest.mark.parametrize("name", registry.names())
def test_every_optimizer_compiles_in_one_graph(name):
    """`fullgraph=True`: every named optimizer's step is one graph, with the eager numbers."""
    assert _run(name, "auto", "eager", whole_step=False, steps=12, fullgraph=True) == 0


@pytest.mark.parametrize("name,impl", [("Adam", "foreach"), ("SGD", "auto"),
                                       ("Lamb", "compiled"), ("RAdam", "foreach")])
def test_a_compiled_training_step_with_inductor(name, impl, monkeypatch):
    """A whole training step compiled with inductor: the eager numbers, no recompiling, RAdam's
    test on the step count included.  (Every tensor large enough for the compiled path to compile
    it.)"""
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 1)
    assert _run(name, impl, "inductor", whole_step=True, steps=100) == 0


def test_a_new_python_number_lr_does_not_recompile():
    """The step reads its hyperparameters when it runs, so a new Python number (not only a
    tensor written in place) reaches the compiled step without compiling again."""
    assert _run("Adam", "foreach", "eager", whole_step=True, steps=24, python_lr=True) == 0


def _steps(opt, model, fn, n=4):
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(n):
        model(x).pow(2).mean().backward()
        fn()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name,settings", [("SGD", {"mom": 0.9, "wd": 0.1, "decouple_wd": False}),
                                           ("Adam", {"wd": 0.01, "sqr_mom": 0.999, "eps": 1e-8})])
def test_fullgraph_step_and_zero_grad_under_a_functionalising_backend(name, settings, backend):
    """`opt.step(); opt.zero_grad()` in one graph (`fullgraph=True`) on backends that
    functionalise the graph (the step's arguments may be copies of the parameters and gradients,
    written back after the graph); SGD's L2 penalty is added to the gradient in place.  Against
    torch.optim run eagerly."""
    torch_cls = {"SGD": torch.optim.SGD, "Adam": torch.optim.AdamW}[name]
    torch_kw = {"SGD": dict(lr=0.1, momentum=0.9, weight_decay=0.1),
                "Adam": dict(lr=0.1, weight_decay=0.01)}[name]
    model, ref = _model(), _model()
    opt = registry.get(name).make(model.parameters(), lr=0.1, **settings)
    ref_opt = torch_cls(ref.parameters(), **torch_kw)

    @torch.compile(fullgraph=True, backend=backend)
    def step():
        opt.step()
        opt.zero_grad()

    def ref_step():
        ref_opt.step()
        ref_opt.zero_grad()

    torch.testing.assert_close(_steps(opt, model, step), _steps(ref_opt, ref, ref_step))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_a_compiled_step_steps_its_own_optimizer_after_a_copy():
    """A compiled function steps the optimizer it was traced for; a deep copy of the optimizer
    (its own state) is stepped by its own function, and the original is left alone."""
    import copy

    model = _model()
    opt = registry.get("Adam").make(model.parameters(), lr=0.1)
    _steps(opt, model, opt.step, n=1)
    twin_model = copy.deepcopy(model)
    twin = copy.deepcopy(opt)
    twin.param_groups[0]["params"] = list(twin_model.parameters())
    twin.state = {q: twin.state[p] for p, q in zip(model.parameters(), twin_model.parameters())}
    before = [p.detach().clone() for p in model.parameters()]
    compiled = torch.compile(twin.step, fullgraph=True, backend="eager")
    for p in twin_model.parameters():
        p.grad = torch.ones_like(p)
    compiled()
    torch.testing.assert_close([p.detach() for p in model.parameters()], before)
    assert all(not torch.equal(p, q) for p, q in zip(twin_model.parameters(), before))


@pytest.mark.parametrize("settings", [{"state_bits": 8}, {"state_bits": 4},
                                      {"state_bits": 16}],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_low_bit_state_under_torch_compile(settings):
    """Quantised state (optcraft.state_codecs) in a compiled step: the eager run's numbers and
    its codes."""
    made = []
    for _ in range(2):
        model = _model()
        made.append((model, registry.get("Adam").make(model.parameters(), lr=0.01, **settings)))
    (model, opt), (ref_model, ref_opt) = made
    compiled = torch.compile(opt.step, fullgraph=True, backend="eager")
    torch.manual_seed(3)  # (the same random numbers for stochastic rounding)
    _steps(opt, model, compiled, n=3)
    torch.manual_seed(3)
    _steps(ref_opt, ref_model, ref_opt.step, n=3)
    torch.testing.assert_close(list(model.parameters()), list(ref_model.parameters()))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for k, v in ref_opt.state[q].items():
            got = opt.state[p][k]
            assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v
