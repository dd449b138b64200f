"""Parameter predicates: which tensors a block acts on (gradient centralisation, the channel-RMS
blocks of StableAdam and AdamAWD).

A predicate is called on each tensor of a bucket and answers True or False, so choosing tensors
never splits the user's parameter groups.  It is bound to its block with `functools.partial`
(`partial(centralize_grad, predicate=by_ndim(4))`), not given as a hyperparameter: param groups
hold numbers only, so that checkpoints load with `torch.load(..., weights_only=True)`.

Predicates combine with `&`, `|` and `~` and are picklable (an optimizer holding one can be
deep-copied and pickled).

    >>> import torch
    >>> conv_weight(torch.zeros(8, 3, 3, 3)), conv_weight(torch.zeros(8, 3))
    (True, False)
    >>> (by_ndim(2) | conv_weight)(torch.zeros(8, 3))
    True
"""
from __future__ import annotations

import fnmatch
from functools import partial
from typing import Callable, Iterable

import torch


class Predicate:
    """A named test on a tensor: `predicate(t) -> bool`; `&`, `|`, `~` combine predicates."""

    __slots__ = ("test", "text")

    def __init__(self, test: Callable[[torch.Tensor], bool], text: str):
        self.test, self.text = test, text

    def __call__(self, t: torch.Tensor) -> bool:
        return bool(self.test(t))

    def __and__(self, other) -> "Predicate":
        return Predicate(partial(_all_of, (self, other)), f"({self!r} & {_name(other)})")

    def __or__(self, other) -> "Predicate":
        return Predicate(partial(_any_of, (self, other)), f"({self!r} | {_name(other)})")

    def __ror__(self, other) -> "Predicate":
        return Predicate(partial(_any_of, (other, self)), f"({_name(other)} | {self!r})")

    def __rand__(self, other) -> "Predicate":
        return Predicate(partial(_all_of, (other, self)), f"({_name(other)} & {self!r})")

    def __invert__(self) -> "Predicate":
        return Predicate(partial(_none_of, (self,)), f"~{self!r}")

    def __repr__(self) -> str:
        return self.text

    def __getstate__(self):
        return self.test, self.text

    def __setstate__(self, state):
        self.test, self.text = state


def _name(p) -> str:
    return repr(p) if isinstance(p, Predicate) else getattr(p, "__name__", repr(p))


def _all_of(tests, t) -> bool:
    return all(test(t) for test in tests)


def _any_of(tests, t) -> bool:
    return any(test(t) for test in tests)


def _none_of(tests, t) -> bool:
    return not any(test(t) for test in tests)


def as_made(t: torch.Tensor) -> torch.Tensor:
    """The parameter as the user made it: the engine hands blocks a complex parameter as its real
    view (a trailing dimension of 2, `torch.view_as_real`), and a predicate must see the complex
    tensor's own shape (a complex 4x3 weight is a matrix, not a convolution weight)."""
    base = t._base
    if base is not None and base.is_complex() and not t.is_complex() and \
            t.dim() == base.dim() + 1 and t.shape[-1] == 2 and t.shape[:-1] == base.shape:
        return base
    return t


def _is_conv_weight(t) -> bool:
    return as_made(t).ndim >= 3


def _is_notebook_conv(t) -> bool:
    t = as_made(t)
    if t.ndim < 4:
        return False
    return not (t.shape[1] == 256 and t.shape[0] < 256)


def _has_ndim(ndims: frozenset, t) -> bool:
    return as_made(t).ndim in ndims


def _is_one_of(tensors: tuple, t) -> bool:
    # The engine may hand a block a real view of a complex parameter (`view_as_real`), whose
    # `_base` is the parameter.
    return any(t is p or t._base is p for p in tensors)


#: A convolution's weight: `(out_channels, in_channels / groups, *kernel)`, 3 to 5 dimensions.
conv_weight = Predicate(_is_conv_weight, "conv_weight")

#: The notebook's `conv_not_cinEq256_coutLt256`: a weight of 4 or more dimensions, except those with
#: 256 input channels and fewer than 256 output channels.
conv_not_cinEq256_coutLt256 = Predicate(_is_notebook_conv, "conv_not_cinEq256_coutLt256")


def by_ndim(*ndims: int) -> Predicate:
    """Tensors with one of these numbers of dimensions: `by_ndim(2, 4)`."""
    if not ndims or not all(isinstance(n, int) and n >= 0 for n in ndims):
        raise ValueError(f"by_ndim: give one or more dimension counts >= 0, got {ndims!r}")
    return Predicate(partial(_has_ndim, frozenset(ndims)),
                     f"by_ndim({', '.join(map(str, sorted(set(ndims))))})")


def by_name(named_parameters, *patterns: str) -> Predicate:
    """The parameters whose name matches one of the shell-style `patterns` (`fnmatch`):
    `by_name(model, "*.conv*.weight", "head.*")`.

    `named_parameters` is a module or an iterable of `(name, parameter)` pairs.  The predicate
    recognises the parameter tensors themselves (and real views of complex ones); it keeps them,
    so a deep copy of an optimizer holding it keeps recognising the copied parameters.  It cannot
    recognise the float32 master copy that a float16/bfloat16 parameter runs on with
    `master_weights=True`: use a shape predicate there, or `master_weights=False`.
    """
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError("by_name: give one or more name patterns (strings)")
    if isinstance(named_parameters, torch.nn.Module):
        named_parameters = named_parameters.named_parameters()
    pairs: Iterable = list(named_parameters)
    chosen = tuple(p for name, p in pairs if any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
    if not chosen:
        names = ", ".join(name for name, _ in pairs[:8])
        raise ValueError(f"by_name: no parameter name matches {', '.join(map(repr, patterns))} "
                         f"(names: {names}{', ...' if len(pairs) > 8 else ''})")
    return Predicate(partial(_is_one_of, chosen), f"by_name({', '.join(map(repr, patterns))})")


__all__ = ["Predicate", "conv_weight", "conv_not_cinEq256_coutLt256", "by_ndim", "by_name"]
