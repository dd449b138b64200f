"""A building block and its specification.

A block is a function `fn(p, **hypers_and_state)` written against `TensorList`: `p` is a
`ParamList` (the parameters of a bucket, with `.grad`), state arrives as `TensorList`s,
hyperparameters as scalars.  It updates `p` in place and/or returns a dict of new state, exactly
as fastai's callbacks do.  `@block(...)` declares, once, everything the rest of optcraft needs to
know about it, as one `Spec` checked when the block is defined:

* `hypers`: the hyperparameters it brings, with their defaults (merged by `Optimizer` in chain
  order); `static`: those it uses in Python control flow (the compiled path makes them constants
  of its graph); `switches`: those whose being zero turns part of the block off (SGD's momentum:
  no buffer while it is 0), which the compiled path passes as the number 0 when they are 0 and
  as a tensor otherwise (see `is_zero`);
* `state`: each entry it keeps or hands on, with its `StateRule`: `like_param`, a `shaped` rule
  (a reduction of the parameter, such as Adafactor's row and column statistics, or a per-matrix
  factor), `scalar` (a 0-d tensor per parameter), `number` (a Python number, the step count),
  `transient` (handed to the blocks after it during this step, never kept), `group(default)`
  (kept once per parameter group: a weight sum, an adaptive step size), `summed` (summed over
  every parameter the chain runs on before the next `reads="all"` block);
* `reads`: what one result depends on: `"elements"` (each element on that element alone; the
  block updates its state in place and leaves the gradient as it is, so an eager path may run it
  on slices), `"tensor"` (whole tensors: per-tensor norms), `"matrix"` (whole matrices: Newton-
  Schulz, factored statistics), `"all"` (every parameter at once: it runs once per group on the
  `summed` values and the group's state), or `"numbers"` (no tensor: numbers from numbers, such
  as the step count, which the compiled path works out in Python).  A function of the block's
  keyword arguments may choose (BAdam reads elements for one of its two secants only).

Checkpoint validation, memory accounting (`optcraft list`), slicing, the compiled path and fused
recognition all read this one specification.

Called on a plain tensor (as the seed's examples do), a block wraps the tensor, its gradient and
its state into lists of one, and unwraps what comes back.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Mapping

import torch

from ..tensorlist import ParamList, TensorList

#: What a block's result depends on (see the module docstring).
READS = ("elements", "tensor", "matrix", "all", "numbers")


@dataclasses.dataclass(frozen=True)
class StateRule:
    """How one state entry is kept.

    `kind`: "tensor" (kept per parameter), "number" (a Python number per parameter), "transient"
    (handed on for this step only), "group" (kept once per parameter group) or "summed" (a
    per-bucket contribution that the engine sums over every parameter).  `shape(param_shape)` is
    the shape a "tensor" entry has for a parameter of that shape, or None where the block keeps no
    such entry for it (Adafactor keeps no row statistics for a vector).  `optional`: the entry may
    be missing (or None) although the rule gives a shape: it is made only once a switch turns
    on.  `default`: a "group" entry's value before the first step.  `signed`: False for an
    entry that is never negative by construction (a second moment, declared with
    `nonnegative`): 8- and 4-bit state (`optcraft.state_codecs`) spends no code on its sign."""

    kind: str
    what: str
    shape: Callable[[tuple], tuple | None] | None = None
    optional: bool | Callable = False
    default: Any = None
    signed: bool = True

    def optional_for(self, bound: Mapping[str, Any]) -> bool:
        """Whether the entry may be missing for a block bound with these keywords (`optional`:
        True, or a function of the bound keywords)."""
        if callable(self.optional):
            accepted = inspect.signature(self.optional).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
                bound = {k: v for k, v in bound.items() if k in accepted}
            return bool(self.optional(**bound))
        return self.optional

    def shape_for(self, param: torch.Tensor) -> tuple | None:
        """The shape this entry has for `param` (None: not kept for it, or not a tensor)."""
        if self.kind != "tensor":
            return None
        shape = self.shape(tuple(param.shape))
        return None if shape is None else tuple(shape)

    @property
    def like_param(self) -> bool:
        return self.what == like_param.what

    def numel_for(self, param: torch.Tensor) -> int:
        shape = self.shape_for(param)
        return 0 if shape is None else math.prod(shape)


def _same_shape(shape):
    return shape


def _no_dimensions(shape):
    return ()


#: A tensor the parameter's shape (Adam's moments).
like_param = StateRule("tensor", "like the parameter", _same_shape)
#: One 0-d tensor per parameter (a per-tensor norm kept across steps).
scalar = StateRule("tensor", "a 0-d tensor", _no_dimensions)
#: A Python number per parameter (the step count).
number = StateRule("number", "a number")
#: Handed to the blocks after this one for this step only; never in the state.
transient = StateRule("transient", "handed on for this step")
#: A per-bucket contribution, summed over every parameter before the next `reads="all"` block.
summed = StateRule("summed", "summed over all parameters")


def shaped(shape: Callable[[tuple], tuple | None], what: str) -> StateRule:
    """A tensor whose shape is `shape(param_shape)` (None: not kept for such a parameter): a
    reduction of the parameter or a per-matrix factor, `what` saying which for `optcraft list`.

        rows = shaped(lambda s: s[:-1] if len(s) >= 2 else None, "row means")
    """
    return StateRule("tensor", what, shape)


def optional(rule: StateRule, when: Callable | bool = True) -> StateRule:
    """`rule`, for an entry that may be missing: made only once a switch turns on (SGD's
    momentum buffer), or kept for some tensors of a bucket only (None for the others).  `when`, a
    function of the block's bound keyword arguments, says for which bindings it is so."""
    return dataclasses.replace(rule, optional=when)


def nonnegative(rule: StateRule) -> StateRule:
    """`rule`, for an entry that is never negative by construction (a running average of
    squares): quantised state stores it with unsigned codes (see `optcraft.state_codecs`).

        state=dict(sqr_avg=nonnegative(like_param))
    """
    return dataclasses.replace(rule, signed=False)


def group(default) -> StateRule:
    """Kept once per parameter group (in the group's `group_state`, saved in `state_dict()`'s
    `param_groups`), starting at `default`: Prodigy's step size `d`, schedule-free's weight sum."""
    return StateRule("group", f"per group (starts at {default!r})", default=default)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a block declares (see the module docstring)."""

    name: str
    hypers: Mapping[str, Any]
    static: frozenset
    switches: frozenset
    state: Mapping[str, StateRule]
    reads: str | Callable
    eval_point: tuple[Callable, Callable] | None = None

    def reads_for(self, bound: Mapping[str, Any]) -> str:
        """What the block reads when called with the keyword arguments `bound`."""
        if callable(self.reads):
            accepted = inspect.signature(self.reads).parameters
            kwargs = bound if any(p.kind is p.VAR_KEYWORD for p in accepted.values()) else \
                {k: v for k, v in bound.items() if k in accepted}
            found = self.reads(**kwargs)
            if found not in READS:
                raise ValueError(f"block {self.name}: its reads function returned {found!r}; "
                                 f"expected one of {READS}")
            return found
        return self.reads

    def entries(self, *kinds: str) -> dict[str, StateRule]:
        """The state entries of these kinds."""
        return {k: r for k, r in self.state.items() if r.kind in kinds}

    @property
    def kept(self) -> dict[str, StateRule]:
        """The entries kept per parameter: tensors and numbers."""
        return self.entries("tensor", "number")


def block(fn: Callable | None = None, *, hypers: Mapping[str, Any] | None = None,
          state: Mapping[str, StateRule] | None = None, reads: str | Callable = "tensor",
          static: tuple = (), switches: tuple = (),
          eval_point: tuple[Callable, Callable] | None = None):
    """Make `fn` a building block with its `Spec` (a decorator, with or without arguments).

        @block(hypers=dict(mom=0.9), state=dict(grad_avg=like_param), reads="elements")
        def average_grad(p, mom, grad_avg=None, **kwargs): ...

    `eval_point=(to_eval, to_train)`: the block trains at one point and is evaluated at another
    (schedule-free); `Optimizer.eval()` calls `to_eval(p, **state_and_hypers)` on every bucket
    and `Optimizer.train()` `to_train(...)`, each moving the parameters in place.
    """
    if fn is None:
        return functools.partial(block, hypers=hypers, state=state, reads=reads, static=static,
                                 switches=switches, eval_point=eval_point)
    spec = _checked_spec(fn, hypers or {}, state or {}, reads, static, switches, eval_point)

    @functools.wraps(fn)
    def call(p, *args, **kwargs):
        if isinstance(p, TensorList):
            return fn(p, *args, **kwargs)
        return _call_on_one(fn, spec, p, args, kwargs)

    call.spec = spec
    call.vectorised = fn
    return call


def _checked_spec(fn, hypers: dict, state: dict, reads, static, switches, eval_point) -> Spec:
    name = getattr(fn, "__name__", repr(fn))

    def fail(message):
        raise TypeError(f"block {name}: {message}")
    if not isinstance(state, Mapping):
        fail(f"state must be a dict of name -> StateRule (like_param, shaped(...), scalar, "
             f"number, transient, group(...), summed), got {state!r}")
    if not isinstance(hypers, Mapping):
        fail(f"hypers must be a dict of name -> default, got {hypers!r}")
    hypers, state = dict(hypers), dict(state)
    for key, rule in state.items():
        if not isinstance(rule, StateRule):
            fail(f"state {key!r} must be a StateRule (like_param, shaped(...), scalar, number, "
                 f"transient, group(...), summed), got {rule!r}")
    if not callable(reads) and reads not in READS:
        fail(f"reads must be one of {READS} or a function of the block's keyword arguments, "
             f"got {reads!r}")
    if isinstance(static, str) or isinstance(switches, str) or \
            not all(isinstance(s, str) for s in [*static, *switches]):
        fail(f"static and switches must be tuples of hyperparameter names, got {static!r} and "
             f"{switches!r}")
    static, switches = frozenset(static), frozenset(switches)
    clash = set(hypers) & set(state)
    if clash:
        fail(f"{sorted(clash)} declared both as hyperparameters and as state")
    params = inspect.signature(fn).parameters
    if not params or list(params.values())[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        fail("a block takes the parameters first: fn(p, **hypers_and_state)")
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        fail("a block must take **kwargs: the chain hands every block all hyperparameters and "
             "state")
    for key in [*hypers, *static, *switches]:
        if key not in params:
            fail(f"declares hyperparameter {key!r} but does not take it as a keyword argument")
    if reads == "numbers":
        kept = {k for k, r in state.items() if r.kind == "tensor"}
        if kept:
            fail(f"reads='numbers' (no tensor) but keeps tensor state {sorted(kept)}")
    if static & switches:
        fail(f"{sorted(static & switches)} declared both static and a switch")
    if eval_point is not None and (not isinstance(eval_point, tuple) or len(eval_point) != 2 or
                                   not all(callable(f) for f in eval_point)):
        fail(f"eval_point must be a pair of functions (to_eval, to_train), got {eval_point!r}")
    return Spec(name, hypers, static, switches, state, reads, eval_point)


class PerParam(list):
    """Non-tensor values (or tensors for some parameters, None for others) that differ between
    the parameters of a bucket, as a block may return them: one per parameter."""


def spec_of(cb) -> tuple[Spec | None, dict]:
    """(spec, bound keyword arguments) of a callback, looking through functools.partial; the spec
    is None for a plain fastai callback."""
    fn, bound = unwrap_partial(cb)
    return getattr(fn, "spec", None), bound


def is_block(cb) -> bool:
    return spec_of(cb)[0] is not None


def is_zero(x) -> bool:
    """Whether a switch hyperparameter is off: a Python number equal to 0.  A tensor is never off
    here (on the compiled path the engine passes a switch that is 0 as the number 0, and one that
    is not as a tensor, so a block may branch on `is_zero(mom)`)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def callback_name(cb) -> str:
    """A callback's name with its bound keywords: `average_grad(dampening=True)`."""
    fn, bound = unwrap_partial(cb)
    name = getattr(fn, "__name__", type(fn).__name__)
    if bound:
        name += "(" + ", ".join(f"{k}={v!r}" for k, v in bound.items()) + ")"
    return name


@torch.no_grad()
def _call_on_one(fn, spec: Spec, p: torch.Tensor, args, kwargs):
    """The seed's calling convention: `state = average_grad(p, mom=0.9, **state)`.  A tensor
    argument is per-parameter data (wrapped in a list of one) when the block declares it as state
    or when it is not 0-d; a 0-d tensor that is not declared state is a scalar (a tensor `lr`)."""
    params = ParamList([p], [p.grad] if p.grad is not None else [None])
    tensor_state = spec.entries("tensor", "transient")
    wrapped = {k: TensorList([v]) if isinstance(v, torch.Tensor) and
               (k in tensor_state or v.dim() > 0) else v for k, v in kwargs.items()}
    grad_before = params.grad[0]
    result = fn(params, *args, **wrapped)
    if params.grad[0] is not grad_before:
        p.grad = params.grad[0]
    if isinstance(result, dict):
        return {k: v[0] if isinstance(v, TensorList) else v for k, v in result.items()}
    return p if isinstance(result, TensorList) else result


def unwrap_partial(cb):
    """(function, bound keyword arguments) of a callback, looking through functools.partial."""
    bound = {}
    while isinstance(cb, functools.partial):
        if cb.args:
            raise TypeError("a callback bound with functools.partial may bind keywords only, "
                            f"got positional arguments {cb.args!r}")
        bound = {**cb.keywords, **bound}
        cb = cb.func
    return cb, bound


def vectorised(cb) -> Callable | None:
    """The bucket-level function of a block callback (partial keywords kept), or None for a plain
    per-parameter callback."""
    fn, bound = unwrap_partial(cb)
    if getattr(fn, "spec", None) is None:
        return None
    return functools.partial(fn.vectorised, **bound) if bound else fn.vectorised
