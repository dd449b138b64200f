"""The `block` decorator: one algorithm piece, callable on one tensor or on a whole bucket.

A block is a function `fn(p, **hypers_and_state)` written against `TensorList`: `p` is a
`ParamList` (the parameters, with `.grad`), state arrives as `TensorList`s, hyperparameters as
scalars.  It updates `p` in place and/or returns a dict of new state, exactly as fastai's
callbacks do.  The decorator adds three things:

* calling it on a plain tensor (as the seed's examples do) wraps the tensor, its gradient and its
  state tensors into lists of one, and unwraps what comes back;
* `defaults`: the hyperparameters it brings, merged by `Optimizer` in chain order;
* metadata for the engine and the CLI: `state` (the per-parameter tensors it keeps, for memory
  accounting), `static` (hyperparameters used in Python control flow, so that the compiled
  path bakes them in rather than passing them as tensors), `host` (the block touches no tensor:
  it returns numbers computed from numeric state and hyperparameters alone, like the step count,
  so the compiled path works them out in Python instead of reading them back from the device) and
  `elementwise` (each element's result depends on that element alone, and the block updates its
  state in place and leaves the gradient as it is, so the eager path may run it on slices of the
  tensors; True, or a function of the block's keyword arguments saying whether they make it so).
  Declared where slicing pays: blocks of several operations or with temporaries (a block of one
  operation passes over memory once either way, and slices cost Python calls); `transient` (what
  it returns under these names goes to the blocks after it in the chain, for this step only, and
  is not kept in the parameters' state); and `ends_graph` (the compiled path on a CPU ends a graph
  after the block and starts another for the rest of the chain: see `optcraft.compiled`).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ..tensorlist import ParamList, TensorList


def block(fn: Callable | None = None, *, defaults: dict | None = None, state: tuple = (),
          static: tuple = (), host: bool = False, elementwise: bool | Callable = False,
          transient: tuple = (), ends_graph: bool = False):
    """Make `fn` a building block (usable as a decorator with or without arguments)."""
    if fn is None:
        return functools.partial(block, defaults=defaults, state=state, static=static, host=host,
                                 elementwise=elementwise, transient=transient,
                                 ends_graph=ends_graph)

    @functools.wraps(fn)
    def call(p, *args, **kwargs):
        if isinstance(p, TensorList):
            return fn(p, *args, **kwargs)
        return _call_on_one(fn, p, args, kwargs)

    call.defaults = dict(defaults or {})
    call.vectorised = fn
    call.state_names = tuple(state)
    call.static = tuple(static)
    call.host = host
    call.elementwise = elementwise
    call.transient_names = tuple(transient)
    call.ends_graph = ends_graph
    call.is_block = True
    return call


@torch.no_grad()
def _call_on_one(fn, p: torch.Tensor, args, kwargs):
    """The seed's calling convention: `state = average_grad(p, mom=0.9, **state)`."""
    params = ParamList([p], [p.grad] if p.grad is not None else [None])
    wrapped = {k: TensorList([v]) if _is_state_of(v, p) else v for k, v in kwargs.items()}
    grad_before = params.grad[0]
    result = fn(params, *args, **wrapped)
    if params.grad[0] is not grad_before:
        p.grad = params.grad[0]
    if isinstance(result, dict):
        return {k: v[0] if isinstance(v, TensorList) else v for k, v in result.items()}
    return p if isinstance(result, TensorList) else result


def _is_state_of(value, p) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == p.shape


def is_block(cb) -> bool:
    return getattr(unwrap_partial(cb)[0], "is_block", False)


def transient_names(cbs) -> frozenset[str]:
    """The names the chain's blocks declare `transient`: passed along during a step, not kept."""
    return frozenset(name for cb in cbs
                     for name in getattr(unwrap_partial(cb)[0], "transient_names", ()))


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
    if not getattr(fn, "is_block", False):
        return None
    return functools.partial(fn.vectorised, **bound) if bound else fn.vectorised
