"""optcraft through PyTorch's own optimizer test machinery and its training stack (issue 7, 1-2).

Part 1 gives every optcraft optimizer an `OptimizerInfo` of `torch.testing._internal.
common_optimizers` (configurations as `OptimizerInput`s, bad ones as `ErrorOptimizerInput`s) and
checks on it the generic properties torch's `test/test_optim.py` checks on torch's optimizers:
errors, state_dict determinism and exact resume through `torch.save`/`torch.load(weights_only=
True)`, a step without gradients changes nothing, complex parameters behave as their
`view_as_real`, a tensor `lr`, step and state-dict hooks, deepcopy and printing.

Part 2 trains with torch's stack: every scheduler of the issue against torch.optim under the same
scheduler, `torch.amp.GradScaler` against the unscaled run, and a `torch.compile`d model.

Expected values come from an independent run: torch.optim, the optimizer on real views of the
complex numbers, an uninterrupted or unscaled run, or the eager model.
"""
from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch.nn import Parameter
from torch.optim import lr_scheduler as sched
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo, OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs)

import optcraft as oc

DEVICE = "cpu"
#: optcraft's execution paths (its equivalent of torch's foreach/fused flags).
IMPLS = ("reference", "foreach")


# ---- the OptimizerInfos -----------------------------------------------------------------------------

def _inputs(*configs):
    """An `optim_inputs_func` giving one `OptimizerInput` per (desc, kwargs)."""
    def optim_inputs_func(device=None, dtype=None):
        return [OptimizerInput(params=None, kwargs=copy.deepcopy(kw), desc=desc)
                for desc, kw in configs]
    return optim_inputs_func


def _param():
    return Parameter(torch.randn(2, 3))


def _error(kwargs, error_type, regex, desc, params=None, on=OptimizerErrorEnum.CONSTRUCTION_ERROR):
    return ErrorOptimizerInput(OptimizerInput(params=params, kwargs=kwargs, desc=desc),
                               error_on=on, error_type=error_type, error_regex=regex)


def _errors_for_all(device, dtype):
    """Bad input every optcraft optimizer refuses, with optcraft's messages."""
    p, q = _param(), _param()
    sparse = _param()
    sparse.grad = torch.zeros(2, 3).to_sparse()
    return [
        _error({"lr": 1e-3}, ValueError, "a parameter appears more than once in the group",
               "duplicate parameters in a group", params=[p, p]),
        _error({"lr": 1e-3}, ValueError, "some parameters appear in more than one parameter group",
               "a parameter in two groups", params=[{"params": [p]}, {"params": [p]}]),
        _error({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "Tensor lr must be 1-element",
               "a tensor lr holds one number"),
        _error({"lr": 1e-3}, ValueError, "all optimizer params should be with/without names",
               "named and unnamed parameters mixed", params=[("w", p), q]),
        _error({"lr": 1e-3}, ValueError, "all optimizer param groups should be with/without names",
               "named and unnamed groups mixed",
               params=[{"params": [p], "lr": 1e-2}, {"params": [("w", q)]}]),
        _error({"lr": -1e-3}, ValueError, r"lr \(parameter group 0\) must be in \[0, inf\)",
               "negative lr"),
        _error({"lr": float("nan")}, ValueError, r"lr \(parameter group 0\) must be in", "nan lr"),
        _error({"lr": "0.1"}, TypeError, r"lr \(parameter group 0\) must be a real number",
               "lr of the wrong type"),
        _error({"lr": 1e-3, "weight_decay": -1.0}, ValueError,
               r"wd \(parameter group 0\) must be in \[0, inf\)", "negative weight_decay"),
        _error({"lr": 1e-3}, ValueError, "empty parameter list", "no parameters", params=[]),
        _error({"lr": 1e-3}, TypeError, "not a dict", "a dict of parameters", params={"w": p}),
        _error({"lr": 1e-3}, ValueError, "can't optimize a non-leaf Tensor", "a non-leaf tensor",
               params=[p * 2]),
        _error({"lr": 1e-3, "impl": "fast"}, ValueError, "impl must be one of", "unknown impl"),
        _error({"lr": 1e-3}, RuntimeError, "sparse gradient", "a sparse gradient",
               params=[sparse], on=OptimizerErrorEnum.STEP_ERROR),
    ]


def _errors(*specific):
    def optim_error_inputs_func(device, dtype):
        return _errors_for_all(device, dtype) + [_error(*args) for args in specific]
    return optim_error_inputs_func


_ADAM_LIKE_ERRORS = (
    ({"lr": 1e-3, "betas": (0.9,)}, ValueError, "'betas' must be a tuple of 2 values",
     "betas of one value"),
    ({"lr": 1e-3, "betas": (1.0, 0.99)}, ValueError, r"mom \(parameter group 0\) must be in \[0, 1\)",
     "beta1 of 1"),
    ({"lr": 1e-3, "betas": (0.9, -0.1)}, ValueError, r"sqr_mom \(parameter group 0\)",
     "negative beta2"),
    ({"lr": 1e-3, "betas": (0.9, 0.99), "mom": 0.9}, ValueError, "both 'betas'",
     "both spellings of beta1"),
    ({"lr": 1e-3, "eps": -1e-8}, ValueError, r"eps \(parameter group 0\)", "negative eps"),
)

_SCHEDULERS = ([lambda opt: sched.StepLR(opt, gamma=0.9, step_size=10),
                lambda opt: sched.ReduceLROnPlateau(opt)],)


def _info(ctor, configs, *errors):
    return OptimizerInfo(
        ctor, optim_inputs_func=_inputs(*configs), optim_error_inputs_func=_errors(*errors),
        scheduler_inputs=_SCHEDULERS,
        # optcraft chooses its execution path with impl=, not torch's foreach/fused flags.
        supported_impls=(), supports_complex=True, supports_sparse=False)


OPTIM_DB = [
    _info(oc.SGD, [("default", {"lr": 1e-2}),
                   ("momentum", {"lr": 1e-2, "momentum": 0.9}),
                   ("momentum, weight_decay", {"lr": 1e-2, "mom": 0.9, "wd": 0.1}),
                   ("L2", {"lr": 1e-2, "mom": 0.9, "wd": 0.1, "decouple_wd": False})],
          ({"lr": 1e-3, "momentum": 1.0}, ValueError, r"mom \(parameter group 0\)", "momentum 1"),
          ({"lr": 1e-3, "momentum": 0.9, "mom": 0.9}, ValueError, "both 'momentum'",
           "both spellings of momentum")),
    _info(oc.RMSProp, [("default", {"lr": 1e-3}),
                       ("momentum", {"lr": 1e-3, "mom": 0.9}),
                       ("weight_decay", {"lr": 1e-3, "sqr_mom": 0.9, "wd": 0.1})],
          ({"lr": 1e-3, "sqr_mom": 1.5}, ValueError, r"sqr_mom \(parameter group 0\)", "alpha > 1")),
    _info(oc.Adam, [("default", {"lr": 1e-2}),
                    ("betas, no weight decay", {"lr": 1e-2, "betas": (0.8, 0.9), "wd": 0.0}),
                    ("L2", {"lr": 1e-2, "wd": 0.1, "decouple_wd": False})],
          *_ADAM_LIKE_ERRORS),
    _info(oc.RAdam, [("default", {"lr": 1e-2}),
                     ("rectified early", {"lr": 1e-2, "sqr_mom": 0.9, "wd": 0.1}),
                     ("SAdam", {"lr": 1e-2, "sqr_mom": 0.9, "beta": 10.0})],
          *_ADAM_LIKE_ERRORS,
          ({"lr": 1e-3, "beta": -1.0}, ValueError, r"beta \(parameter group 0\)", "negative beta")),
    _info(oc.QHAdam, [("default", {"lr": 1e-2}),
                      ("nu", {"lr": 1e-2, "nu_1": 0.5, "nu_2": 0.8, "wd": 0.1})],
          *_ADAM_LIKE_ERRORS,
          ({"lr": 1e-3, "nu_1": 2.0}, ValueError, r"nu_1 \(parameter group 0\) must be in \[0, 1\]",
           "nu_1 > 1")),
    _info(oc.Larc, [("LARC", {"lr": 0.5}),
                    ("LARS", {"lr": 0.5, "clip": False}),
                    ("no momentum, L2", {"lr": 0.5, "mom": 0.0, "wd": 0.1, "decouple_wd": False})],
          ({"lr": 1e-3, "trust_coeff": -1.0}, ValueError, r"trust_coeff \(parameter group 0\)",
           "negative trust_coeff")),
    _info(oc.Lamb, [("default", {"lr": 1e-2}),
                    ("weight_decay", {"lr": 1e-2, "wd": 0.1}),
                    ("L2", {"lr": 1e-2, "wd": 0.1, "decouple_wd": False})],
          *_ADAM_LIKE_ERRORS),
    _info(oc.ranger, [("default", {"lr": 1e-2}),
                      ("k=2", {"lr": 1e-2, "k": 2, "alpha": 0.3, "wd": 0.0})],
          ({"lr": 1e-3, "k": 0}, ValueError, "k must be an integer >= 1", "k of 0"),
          ({"lr": 1e-3, "alpha": 2.0}, ValueError, r"alpha must be in \[0, 1\]", "alpha > 1")),
]

#: Optimizers whose update of a tensor depends on the whole tensor (its norm), not element by
#: element: a complex parameter is not the same as its real and imaginary parts as two parameters.
PER_TENSOR_NORMS = {"Larc", "Lamb"}

optim_infos = pytest.mark.parametrize("optim_info", OPTIM_DB, ids=lambda info: info.name)
impls = pytest.mark.parametrize("impl", IMPLS)


def all_inputs(optim_info, dtype=torch.float64, impl=None):
    """The configurations of `optim_info`, through torch's helper (which adds torch's foreach/fused
    variants where an info declares them; optcraft's declare none), with `impl` set."""
    found = _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, dtype, optim_info)
    if impl is not None:
        for optim_input in found:
            optim_input.kwargs["impl"] = impl
    return found


def weight_bias_input(dtype=torch.float64, contiguous=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = Parameter(torch.randn(10, 5, generator=g, dtype=dtype))
        bias = Parameter(torch.randn(10, generator=g, dtype=dtype))
    else:
        weight = Parameter(torch.randn(10, 5, 2, generator=g, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn(10, 2, generator=g, dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, generator=g, dtype=dtype)


def make_closure(optimizer, weight, bias, inpt):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(inpt) + bias).pow(2).sum()
        loss.backward()
        return loss
    return closure


# ---- part 1: the generic properties --------------------------------------------------------------------

def test_infos_cover_every_named_optimizer():
    assert {info.name for info in OPTIM_DB} == {
        "SGD", "RMSProp", "Adam", "RAdam", "QHAdam", "Larc", "Lamb", "ranger"}
    for info in OPTIM_DB:
        for optim_input in info.optim_inputs_func(device=DEVICE):
            # torch's rule for OptimizerInfos: no execution flags in the configurations
            assert not {"foreach", "fused", "differentiable", "impl"} & set(optim_input.kwargs)


@optim_infos
def test_errors(optim_info):
    for error_input in optim_info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params = optim_input.params if optim_input.params is not None else [_param()]
        kwargs = optim_input.kwargs
        expect = (pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises)
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with expect(error_input.error_type, match=error_input.error_regex):
                optim_info.optim_cls(params, **kwargs)
        else:
            optimizer = optim_info.optim_cls(params, **kwargs)
            before = [p.detach().clone() for p in params]
            with expect(error_input.error_type, match=error_input.error_regex):
                optimizer.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before)), optim_input.desc


@optim_infos
def test_a_single_tensor_is_one_group_as_in_fastai(optim_info):
    # torch refuses a bare tensor; fastai's optimizers (and so optcraft's) take it as [tensor].
    p = _param()
    q = p.detach().clone().requires_grad_()
    kwargs = all_inputs(optim_info)[0].kwargs
    one, listed = optim_info.optim_cls(p, **kwargs), optim_info.optim_cls([q], **kwargs)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        one.step()
        listed.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)


@optim_infos
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
def test_goes_right_direction_with_schedulers_and_param_groups(optim_info, contiguous):
    """torch's test_forloop_goes_right_direction and
    test_param_group_with_lrscheduler_goes_right_direction, on both impls."""
    for optim_input, impl, schedulers_c in itertools.product(
            all_inputs(optim_info), IMPLS, optim_info.scheduler_inputs + ([],)):
        weight, bias, inpt = weight_bias_input(contiguous=contiguous)
        kwargs = {**optim_input.kwargs, "impl": impl}
        lr = kwargs.pop("lr")
        optimizer = optim_info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": lr / 2}],
                                         lr=lr, **kwargs)
        schedulers = [make(optimizer) for make in schedulers_c]
        closure = make_closure(optimizer, weight, bias, inpt)
        initial = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            for s in schedulers:
                s.step(loss.item()) if isinstance(s, sched.ReduceLROnPlateau) else s.step()
        assert closure().item() < initial, (optim_input.desc, impl)


@optim_infos
def test_step_without_grads_changes_nothing(optim_info):
    params = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]  # no requires_grad
    before = [p.clone() for p in params]
    for optim_input in all_inputs(optim_info):
        optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
        loss = optimizer.step(lambda: torch.tensor([1.0]))
        assert loss.item() == 1.0
        assert all(torch.equal(p, b) for p, b in zip(params, before)), optim_input.desc
        assert all(not s for s in optimizer.state.values()), optim_input.desc


@optim_infos
def test_zero_grad_zeroes_in_place_by_default_and_none_gives_a_no_op(optim_info):
    weight, bias, inpt = weight_bias_input()
    optimizer = optim_info.optim_cls([weight, bias], **all_inputs(optim_info)[0].kwargs)
    closure = make_closure(optimizer, weight, bias, inpt)
    closure()
    optimizer.step()
    grad = weight.grad
    optimizer.zero_grad()  # fastai's default: zero the gradient tensors in place
    assert weight.grad is grad and not weight.grad.any()
    optimizer.zero_grad(set_to_none=True)  # torch's default, accepted
    assert weight.grad is None and bias.grad is None
    params, state = [weight.detach().clone(), bias.detach().clone()], \
        copy.deepcopy(optimizer.state_dict()["state"])
    optimizer.step()
    torch.testing.assert_close([weight, bias], params, rtol=0, atol=0)
    torch.testing.assert_close(optimizer.state_dict()["state"], state, rtol=0, atol=0)


@optim_infos
def test_step_is_noop_for_zero_grads_without_weight_decay(optim_info):
    for optim_input in all_inputs(optim_info):
        kwargs = {**optim_input.kwargs, "wd": 0.0}
        kwargs.pop("weight_decay", None)
        param = Parameter(torch.randn(5, 1, dtype=torch.float64))
        before = param.detach().clone()
        optimizer = optim_info.optim_cls([param], **kwargs)
        for _ in range(7):  # past ranger's synchronisation
            param.grad = torch.zeros_like(param)
            optimizer.step()
        torch.testing.assert_close(param, before, rtol=0, atol=0, msg=optim_input.desc)


@optim_infos
@impls
def test_complex_is_the_optimizer_on_view_as_real(optim_info, impl):
    """torch's test_complex: complex parameters (mixed with a real one) follow, step by step, the
    same optimizer on `view_as_real` of them; the state keeps the complex parameter's shape."""
    for optim_input in all_inputs(optim_info, torch.complex64, impl):
        g = torch.Generator().manual_seed(1)
        complex_params = [torch.randn(10, 5, dtype=torch.complex64, generator=g, requires_grad=True),
                          torch.randn(10, dtype=torch.complex64, generator=g, requires_grad=True),
                          torch.randn(10, 5, dtype=torch.float32, generator=g, requires_grad=True)]
        real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone()
                       .requires_grad_() for p in complex_params]
        complex_opt = optim_info.optim_cls(complex_params, **optim_input.kwargs)
        real_opt = optim_info.optim_cls(real_params, **optim_input.kwargs)
        for _ in range(7):
            for c, r in zip(complex_params, real_params):
                r.grad = torch.randn(r.shape, generator=g)
                c.grad = torch.view_as_complex(r.grad.clone()) if c.is_complex() else r.grad.clone()
            real_opt.step()
            complex_opt.step()
            as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
            torch.testing.assert_close(as_real, real_params, rtol=0, atol=0, msg=optim_input.desc)
        for p in complex_params:
            for value in complex_opt.state[p].values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert value.shape == p.shape and value.dtype == p.dtype


@optim_infos
def test_complex_checkpoint_resumes_exactly(optim_info):
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, 3, dtype=torch.complex128, generator=g) for _ in range(8)]

    def run(opt, p, grads):
        for grad in grads:
            p.grad = grad.clone()
            opt.step()

    kwargs = all_inputs(optim_info)[0].kwargs
    p = torch.randn(4, 3, dtype=torch.complex128, generator=g, requires_grad=True)
    start = p.detach().clone()
    whole = optim_info.optim_cls([p], **kwargs)
    run(whole, p, grads)
    q = start.clone().requires_grad_()
    first = optim_info.optim_cls([q], **kwargs)
    run(first, q, grads[:4])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = optim_info.optim_cls([q], **kwargs)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    run(second, q, grads[4:])
    torch.testing.assert_close(q, p, rtol=0, atol=0)


@optim_infos
def test_complex_2d_is_the_optimizer_on_real_and_imaginary_parts(optim_info):
    """torch's test_complex_2d: a complex parameter against its real and imaginary parts as two
    parameters, through the Rosenbrock function.  For elementwise algorithms they agree; LARC and
    LAMB scale a tensor by its norm, which for the complex tensor covers both parts, so there the
    split run must differ (the complex run equals the view_as_real run, tested above)."""
    for optim_input in all_inputs(optim_info, torch.complex64):
        torch.manual_seed(2024)
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real = a1.real.detach().clone().requires_grad_()
        a1_imag = a1.imag.detach().clone().requires_grad_()
        optim1 = optim_info.optim_cls([a1], **optim_input.kwargs)
        optim2 = optim_info.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
        for i in range(3):
            optim1.zero_grad()
            optim2.zero_grad()
            rosenbrock(a1).abs().backward()
            rosenbrock(torch.complex(a1_real, a1_imag)).abs().backward()
            if i == 0 or optim_info.name not in PER_TENSOR_NORMS:  # after step 1 the runs diverge
                torch.testing.assert_close(a1.grad.real, a1_real.grad)
                torch.testing.assert_close(a1.grad.imag, a1_imag.grad)
            optim1.step()
            optim2.step()
            if optim_info.name not in PER_TENSOR_NORMS:
                torch.testing.assert_close(a1.real, a1_real, msg=optim_input.desc)
                torch.testing.assert_close(a1.imag, a1_imag, msg=optim_input.desc)
                with torch.no_grad():  # realign, as torch's TensorTracker does
                    a1_real.copy_(a1.real)
                    a1_imag.copy_(a1.imag)
        if optim_info.name in PER_TENSOR_NORMS:
            assert not torch.allclose(torch.view_as_real(a1), torch.stack([a1_real, a1_imag], -1))


def rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


@optim_infos
@impls
def test_tensor_lr(optim_info, impl):
    """A 0-d tensor lr gives the float lr's trajectory (to rounding: the tensor is multiplied in,
    never read back to the host), also while a scheduler changes it (torch's schedulers write a
    tensor lr in place)."""
    for optim_input in all_inputs(optim_info, impl=impl):
        weight, bias, inpt = weight_bias_input()
        weight_c = weight.detach().clone().requires_grad_()
        bias_c = bias.detach().clone().requires_grad_()
        kwargs = dict(optim_input.kwargs)
        lr = kwargs.pop("lr")
        float_opt = optim_info.optim_cls([weight, bias], lr=lr, **kwargs)
        lr_tensor = torch.tensor(lr, dtype=torch.float64)
        tensor_opt = optim_info.optim_cls([weight_c, bias_c], lr=lr_tensor, **kwargs)
        schedulers = [sched.StepLR(o, step_size=2, gamma=0.5) for o in (float_opt, tensor_opt)]
        for _ in range(6):
            float_opt.step(make_closure(float_opt, weight, bias, inpt))
            tensor_opt.step(make_closure(tensor_opt, weight_c, bias_c, inpt))
            for s in schedulers:
                s.step()
            torch.testing.assert_close([weight_c, bias_c], [weight, bias],
                                       msg=optim_input.desc)
        assert tensor_opt.param_groups[0]["lr"] is lr_tensor
        assert lr_tensor.item() == pytest.approx(lr / 8)


def train_closure_steps(optimizer, closure, n):
    for _ in range(n):
        optimizer.step(closure)


@optim_infos
@impls
def test_state_dict_deterministic_and_resumes_through_weights_only_load(optim_info, impl):
    """torch's _test_state_dict: a second optimizer on equal (not identical) parameters, loaded
    from the first one's state dict through torch.save / torch.load(weights_only=True), follows
    it exactly; loading does not change the state dict; both then save equal state dicts."""
    for optim_input in all_inputs(optim_info, impl=impl):
        weight, bias, inpt = weight_bias_input()
        optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = make_closure(optimizer, weight, bias, inpt)
        train_closure_steps(optimizer, closure, 5)
        weight_c = weight.detach().clone().requires_grad_()
        bias_c = bias.detach().clone().requires_grad_()
        optimizer_c = optim_info.optim_cls([weight_c, bias_c], **optim_input.kwargs)
        closure_c = make_closure(optimizer_c, weight_c, bias_c, inpt)
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        kept = copy.deepcopy(loaded)
        optimizer_c.load_state_dict(loaded)
        torch.testing.assert_close(loaded, kept, rtol=0, atol=0)
        for _ in range(7):
            optimizer.step(closure)
            optimizer_c.step(closure_c)
            torch.testing.assert_close([weight_c, bias_c], [weight, bias], rtol=0, atol=0,
                                       msg=optim_input.desc)
        torch.testing.assert_close(optimizer_c.state_dict(), optimizer.state_dict(), rtol=0, atol=0)


@optim_infos
def test_state_dict_holds_plain_data_only(optim_info):
    """What `torch.load(weights_only=True)` accepts: tensors, numbers, strings, tuples, lists and
    plain dicts (no optcraft classes)."""
    weight, bias, inpt = weight_bias_input()
    optimizer = optim_info.optim_cls([weight, bias], **all_inputs(optim_info)[0].kwargs)
    train_closure_steps(optimizer, make_closure(optimizer, weight, bias, inpt), 2)

    def check(x):
        if isinstance(x, dict):
            assert type(x) is dict, type(x)
            for k, v in x.items():
                check(k)
                check(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                check(v)
        else:
            assert isinstance(x, (torch.Tensor, int, float, bool, str, type(None))), type(x)

    check(optimizer.state_dict())


@optim_infos
def test_step_hooks(optim_info):
    """Instance and global step hooks fire in torch's order; a pre-hook may replace the arguments
    (here the closure); removed hooks stop firing."""
    weight, bias, inpt = weight_bias_input()
    optimizer = optim_info.optim_cls([weight, bias], **all_inputs(optim_info)[0].kwargs)
    closure = make_closure(optimizer, weight, bias, inpt)
    calls = []

    def swap_closure(opt, args, kwargs):
        calls.append("pre")
        assert opt is optimizer
        # torch hands a pre-hook the step's positional arguments including the optimizer itself
        return (opt,), {"closure": lambda: (calls.append("closure"), closure())[1]}

    handles = [
        register_optimizer_step_pre_hook(lambda opt, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda opt, a, k: calls.append("global post")),
        optimizer.register_step_pre_hook(swap_closure),
        optimizer.register_step_post_hook(lambda opt, a, k: calls.append("post")),
    ]
    try:
        loss = optimizer.step()
        assert isinstance(loss, torch.Tensor)
        if hasattr(optimizer, "opt"):
            # A wrapper steps its inner optimizer, itself a torch optimizer: torch's global hooks
            # fire for that step too, as they do inside torch's ZeroRedundancyOptimizer.
            assert calls == ["global pre", "pre", "closure", "global pre", "global post", "post",
                             "global post"]
            calls[3:5] = []
        assert calls == ["global pre", "pre", "closure", "post", "global post"]
        for handle in handles:
            handle.remove()
        optimizer.step(closure)
        assert calls == ["global pre", "pre", "closure", "post", "global post"]
    finally:
        for handle in handles:
            handle.remove()


@optim_infos
def test_state_dict_hooks(optim_info):
    """state_dict pre/post hooks and load_state_dict pre/post hooks fire on the optimizer the user
    holds, in order (prepend honoured), and their return values are used."""
    weight, bias, inpt = weight_bias_input()
    kwargs = all_inputs(optim_info)[0].kwargs
    optimizer = optim_info.optim_cls([weight, bias], **kwargs)
    train_closure_steps(optimizer, make_closure(optimizer, weight, bias, inpt), 2)
    calls = []

    def add_note(opt, sd):
        calls.append("post")
        sd = dict(sd)
        sd["note"] = "saved"
        return sd

    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("first pre"), prepend=True)
    optimizer.register_state_dict_post_hook(add_note)
    sd = optimizer.state_dict()
    assert calls == ["first pre", "pre", "post"] and sd["note"] == "saved"

    other = optim_info.optim_cls([weight.detach().clone().requires_grad_(),
                                  bias.detach().clone().requires_grad_()], **kwargs)
    seen = []

    def drop_note(opt, sd):
        seen.append(sd.get("note"))
        sd = dict(sd)
        sd.pop("note")
        return sd

    other.register_load_state_dict_pre_hook(drop_note)
    other.register_load_state_dict_post_hook(lambda opt: seen.append("loaded"))
    other.load_state_dict(sd)
    assert seen == ["saved", "loaded"]
    torch.testing.assert_close(other.state_dict(), {k: v for k, v in sd.items() if k != "note"},
                               rtol=0, atol=0)


@optim_infos
def test_deepcopy_copies_public_attributes_and_continues_identically(optim_info):
    weight, bias, inpt = weight_bias_input()
    optimizer = optim_info.optim_cls([weight, bias], **all_inputs(optim_info)[0].kwargs)
    train_closure_steps(optimizer, make_closure(optimizer, weight, bias, inpt), 3)
    (weight_c, bias_c), optimizer_c = copy.deepcopy(((weight, bias), optimizer))

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    assert public(optimizer_c) == public(optimizer)
    assert optimizer_c.param_groups[0]["params"][0] is weight_c
    train_closure_steps(optimizer, make_closure(optimizer, weight, bias, inpt), 3)
    train_closure_steps(optimizer_c, make_closure(optimizer_c, weight_c, bias_c, inpt), 3)
    torch.testing.assert_close([weight_c, bias_c], [weight, bias], rtol=0, atol=0)


@optim_infos
def test_printing(optim_info):
    weight, bias, _ = weight_bias_input()
    kwargs = dict(all_inputs(optim_info)[0].kwargs)
    lr = kwargs.pop("lr")
    optimizer = optim_info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": lr / 2}],
                                     lr=torch.tensor(lr), **kwargs)
    text = repr(optimizer)
    assert str(optimizer) == text
    assert "Parameter Group 0" in text and "Parameter Group 1" in text
    # torch's repr formats a 0-d tensor lr through Tensor.__format__, i.e. as its float value
    assert f"lr: {lr / 2}" in text and f"lr: {torch.tensor(lr).item()}" in text
    assert "chain: " in text
    if optim_info.name == "ranger":
        assert text.startswith("Lookahead(k=6, alpha=0.5) of Optimizer (")


# ---- part 2: torch's training stack ---------------------------------------------------------------------

def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 3)).to(dtype)


def batches(n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 3, generator=g,
                                                                        dtype=dtype))
            for _ in range(n)]


#: optcraft recipe -> torch.optim optimizer with the same update.
PAIRS = {
    "SGD": (lambda ps: oc.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2, decouple_wd=False),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2)),
    "Adam": (lambda ps: oc.Adam(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2),
             lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                                          weight_decay=1e-2)),
}

N_STEPS = 30
#: metrics for ReduceLROnPlateau, the same for both runs: plateaus at steps 3-5 and 12-30.
PLATEAU_METRICS = [1.0, 0.9, 0.8] + [0.8] * 3 + [0.7, 0.6, 0.5, 0.4, 0.3, 0.2] + [0.2] * 18

SCHEDULERS = {
    "StepLR": lambda opt: sched.StepLR(opt, step_size=7, gamma=0.5),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=N_STEPS, eta_min=1e-4),
    "OneCycleLR": lambda opt: sched.OneCycleLR(opt, max_lr=0.05, total_steps=N_STEPS,
                                               cycle_momentum=True, base_momentum=0.8,
                                               max_momentum=0.95),
    "ReduceLROnPlateau": lambda opt: sched.ReduceLROnPlateau(opt, factor=0.5, patience=1),
    "LambdaLR": lambda opt: sched.LambdaLR(opt, lambda epoch: 0.95 ** epoch),
    "SequentialLR": lambda opt: sched.SequentialLR(
        opt, [sched.LinearLR(opt, start_factor=0.1, total_iters=5),
              sched.CosineAnnealingLR(opt, T_max=N_STEPS - 5)], milestones=[5]),
}


def momentum_of(group):
    return group["betas"][0] if "betas" in group else group["momentum"]


def train_under_scheduler(make_opt, make_sched, data):
    model = mlp()
    opt = make_opt(model.parameters())
    scheduler = make_sched(opt)
    trace = []
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if isinstance(scheduler, sched.ReduceLROnPlateau):
            scheduler.step(PLATEAU_METRICS[i])
        else:
            scheduler.step()
        group = opt.param_groups[0]
        trace.append((group["lr"], momentum_of(group)))
    return [p.detach() for p in model.parameters()], trace


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_schedulers_drive_optcraft_as_they_drive_torch_optim(scheduler, pair):
    data = batches(N_STEPS)
    ours, torch_optim = PAIRS[pair]
    params, trace = train_under_scheduler(ours, SCHEDULERS[scheduler], data)
    expected_params, expected_trace = train_under_scheduler(torch_optim, SCHEDULERS[scheduler], data)
    flat = [v for pair_ in trace for v in pair_]
    assert flat == pytest.approx([v for pair_ in expected_trace for v in pair_], rel=1e-12)
    lrs = [lr for lr, _ in trace]
    assert len(set(lrs)) > 2, "the scheduler should have changed lr"
    if scheduler == "OneCycleLR":
        assert len({m for _, m in trace}) > 2, "OneCycleLR should have cycled the momentum"
    torch.testing.assert_close(params, expected_params, rtol=1e-9, atol=1e-11)


@optim_infos
def test_grad_scaler_matches_the_unscaled_run(optim_info):
    """GradScaler (CPU): gradients unscaled before the step (and clipped after `unscale_`), the
    step with an inf gradient skipped.  The scale is a power of two, so the unscaled run that skips
    the same step is the exact expectation."""
    data = batches(8, dtype=torch.float32)
    bad_step = 3
    kwargs = all_inputs(optim_info)[0].kwargs

    def run(scaled):
        model = mlp(dtype=torch.float32)
        opt = optim_info.optim_cls(model.parameters(), **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
        scales = []
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            (scaler.scale(loss) if scaled else loss).backward()
            if i == bad_step:
                model[0].weight.grad[0, 0] = float("inf")
            if scaled:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
            elif i != bad_step:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
        return [p.detach() for p in model.parameters()], scales

    params, scales = run(scaled=True)
    expected, _ = run(scaled=False)
    torch.testing.assert_close(params, expected, rtol=0, atol=0)
    assert scales[bad_step] == scales[bad_step - 1] / 2  # the skipped step halved the scale
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Adam", "Lamb"])
def test_compiled_model_trains_like_the_eager_model(name):
    make = {"Adam": lambda ps: oc.Adam(ps, lr=1e-2),
            "Lamb": lambda ps: oc.Lamb(ps, lr=1e-2, wd=1e-2)}[name]
    data = batches(6, dtype=torch.float32)

    def run(compile_model):
        model = mlp(dtype=torch.float32)
        forward = torch.compile(model) if compile_model else model
        opt = make(model.parameters())
        losses = []
        for x, y in data:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return [p.detach() for p in model.parameters()], losses

    torch._dynamo.reset()
    params, losses = run(compile_model=True)
    expected, expected_losses = run(compile_model=False)
    assert losses == pytest.approx(expected_losses, rel=1e-4)
    torch.testing.assert_close(params, expected, rtol=1e-4, atol=1e-5)
