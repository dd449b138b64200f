"""Every named optimizer of optcraft, by name: its recipe, its chain of blocks, its defaults, the
state it keeps per parameter and its paper.

The chain and the state are read from an optimizer the recipe builds (its chain, and the state
its blocks' specifications declare; one step on a small parameter shows what a wrapper such as
Lookahead adds), so the registry can never disagree with the code it describes.  The classic recipes come from
`optcraft.optimizers.classic`; the research recipes from `optcraft.optimizers.research` when that
module is installed (every function in its `__all__` that takes an `lr`).

    >>> from optcraft import registry
    >>> registry.get("Adam").state_names
    ('grad_avg', 'sqr_avg')
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .blocks.base import callback_name
from .hypers import EXECUTION_KEYWORDS
from .state_codecs import STATE_BITS
from .optimizers import classic


#: Modules whose recipes join the registry when they can be imported.
OPTIONAL_MODULES = ("optcraft.optimizers.research", "optcraft.optimizers.torch_family",
                    "optcraft.optimizers.modern", "optcraft.optimizers.matrix",
                    "optcraft.optimizers.lr_free")


@dataclass(frozen=True)
class Entry:
    """One named optimizer.

    `settings` are keyword arguments the command-line tools always pass (SGD gets momentum), and
    `lr` the learning rate they use unless told otherwise: the best of a sweep (half-decade steps,
    10 epochs, seeds 0 and 1) on the digits conv net of `optcraft compare` (`lr_tuned=False` where
    it is the recipe's own default, not a sweep's result).
    """

    name: str
    factory: Callable
    paper: str
    lr: float
    settings: dict = field(default_factory=dict)
    lr_tuned: bool = True
    module: str = ""

    def make(self, params, lr: float | None = None, impl: str | None = None, **kwargs):
        """Build the optimizer on `params` with this entry's settings and learning rate.  A
        recipe for matrices only (`matrices_only`: Muon) gets the parameters of two dimensions,
        and Adam (the command line's, at the same learning rate) the others, as Muon is trained
        (`optcraft.routing`)."""
        kwargs = {**self.settings, **kwargs}
        if impl is not None and "impl" in self.parameters:
            kwargs["impl"] = impl
        lr = self.lr if lr is None else lr
        if self.matrices_only:
            from .predicates import by_ndim
            from .routing import part, route

            execution = {k: kwargs.pop(k) for k in (*EXECUTION_KEYWORDS, "state_bits", "rounding")
                         if k in kwargs}
            return route(params, part(self.factory, where=by_ndim(2), lr=lr, **kwargs),
                         part(classic.Adam, lr=lr), **execution)
        return self.factory(params, lr=lr, **kwargs)

    @property
    def matrices_only(self) -> bool:
        return bool(getattr(self.factory, "matrices_only", False))

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(inspect.unwrap(self.factory)).parameters)

    @property
    def summary(self) -> str:
        """The first paragraph of the recipe's docstring, on one line."""
        doc = inspect.getdoc(self.factory) or ""
        return " ".join(doc.split("\n\n")[0].split())

    @property
    def defaults(self) -> dict:
        """The recipe's keyword defaults (what it computes with when given only `lr`)."""
        out = {}
        for name, param in self.parameters.items():
            if param.default is inspect.Parameter.empty or name in EXECUTION_KEYWORDS or name == "lr":
                continue
            out[name] = param.default
        return out

    @property
    def chain(self) -> list[str]:
        """The blocks the recipe chains (with `settings` applied), as `name(bound=keywords)`."""
        return list(_introspect(self)[0])

    @property
    def wrapper(self) -> str | None:
        """`Lookahead(k=6, alpha=0.5)` for a wrapped optimizer, else None."""
        return _introspect(self)[1]

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state tensors the optimizer keeps per parameter that are the parameter's size."""
        return _introspect(self)[2]

    @property
    def state_memory(self) -> int:
        """How many parameter-sized tensors of state it keeps per parameter (Adam: 2)."""
        return len(self.state_names)

    @property
    def state_bytes(self) -> float:
        """Bytes of state it keeps per parameter element of a float32 1024 x 1024 weight, from
        its blocks' specifications (Adam: 8.0; a factored statistic costs a fraction), with its
        hyperparameters as listed (RMSProp at `mom=0` keeps no momentum: 4.0)."""
        return self.state_bytes_at(32)

    def state_bytes_at(self, state_bits: int) -> float:
        """`state_bytes` with the state stored at `state_bits` (`optcraft.state_codecs`: Adam
        at 8 bits keeps 2 x (1 + 4/256) bytes, codes and a float32 scale per 256 elements)."""
        return dict(_introspect(self)[4])[state_bits]

    @property
    def hyperparameters(self) -> dict:
        """The hyperparameters in its param groups (the blocks' defaults merged with the recipe's)."""
        return dict(_introspect(self)[3])


#: The weight `state_bytes` is worked out for (on the meta device: nothing is allocated).
TYPICAL_WEIGHT = (1024, 1024)


@functools.lru_cache(maxsize=None)
def _introspect_cached(name: str, factory, settings_items: tuple, lr: float):
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, 5, generator=generator, dtype=torch.float32))
    opt = factory([param], lr=lr, **dict(settings_items))
    inner, wrapper = opt, None
    # A wrapper (Lookahead) holds the optimizer whose chain runs in `.opt`.
    while not hasattr(inner, "chains") and hasattr(inner, "opt"):
        if wrapper is None:
            extras = {k: getattr(inner, k) for k in ("k", "alpha") if hasattr(inner, k)}
            wrapper = type(inner).__name__ + "(" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
        inner = inner.opt
    chains = list(getattr(inner, "chains", {}).values())
    declared = [k for chain in chains for k, rule in chain.kept.items() if rule.like_param]
    param.grad = torch.randn(4, 5, generator=generator)
    opt.step()
    state = opt.state[param]
    sized = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == param.shape]
    # The blocks' own names first, in chain order; then what a wrapper added (Lookahead's copy).
    ordered = tuple(dict.fromkeys([k for k in declared if k in sized] +
                                  [k for k in sized if k not in declared]))
    typical = torch.empty(TYPICAL_WEIGHT, device="meta")
    # What a wrapper adds (Lookahead's slow weights) is not the blocks' state: no codec stores
    # it otherwise than in float32, at every state_bits.
    added = sum(1 for k in sized if all(k not in chain.kept for chain in chains))
    # optional entries (RMSProp's momentum, made once `mom` is on) as the step made them
    made = {k for k, v in state.items() if v is not None}
    per_element = tuple(
        (bits, max((chain.state_bytes(typical, state_bits=bits, made=made) for chain in chains),
                   default=0)
         / typical.numel() + added * typical.element_size())
        for bits in STATE_BITS)
    hypers = {k: v for k, v in inner.param_groups[0].items()
              if k not in ("params", "param_names", "chain", "group_state")}
    names = tuple(name for chain in chains for name in chain.names())
    return names, wrapper, ordered, tuple(hypers.items()), per_element


def _introspect(entry: Entry):
    return _introspect_cached(entry.name, entry.factory, tuple(sorted(entry.settings.items())),
                              entry.lr)


# ---- the entries -------------------------------------------------------------------------------

_CLASSIC = [
    Entry("SGD", classic.SGD, "Robbins & Monro 1951; momentum: Polyak 1964", lr=0.1,
          settings={"mom": 0.9}),
    Entry("RMSProp", classic.RMSProp, "Hinton, Coursera lecture 6e, 2012", lr=1e-3),
    Entry("Adam", classic.Adam, "Kingma & Ba 2015, arXiv:1412.6980; AdamW: arXiv:1711.05101",
          lr=1e-2),
    Entry("RAdam", classic.RAdam, "Liu et al. 2020, arXiv:1908.03265", lr=3e-3),
    Entry("QHAdam", classic.QHAdam, "Ma & Yarats 2019, arXiv:1810.06801", lr=1e-2),
    Entry("Larc", classic.Larc, "You et al. 2017, arXiv:1708.03888", lr=0.1),
    Entry("Lamb", classic.Lamb, "You et al. 2020, arXiv:1904.00962", lr=1e-2),
    Entry("ranger", classic.ranger,
          "Wright 2019; RAdam arXiv:1908.03265 + Lookahead arXiv:1907.08610", lr=1e-2),
]

#: Learning rates for research recipes, from the same sweep (1e-3 to 3e-2); a research recipe not
#: listed here gets its own default learning rate (its reference's; Adam's sweep value where it has
#: none) with `lr_tuned=False`.  DuvAdam and SUAdam were still improving at the
#: sweep's largest rate.  BAdam (with the algorithm cell's softplus secant; the notebook code's
#: `sign_clamp` made its loss NaN at every rate) from 1e-2 to 3e-1: 0.922, 0.961, 0.981, 0.975.
_RESEARCH_LR: dict[str, float] = {
    "SAdam": 1e-2, "StableAdam": 3e-3, "SRAdam": 1e-2, "LAMB": 1e-2, "AdamGC": 3e-3,
    "AdamAWD": 3e-3, "UM": 1e-3, "PreLAMB": 3e-2, "DuvAdam": 3e-2, "SUAdam": 3e-2,
    "BAdam": 1e-1,
}

#: The optimizers `optcraft compare` runs by default (those not installed are left out).
DEFAULT_COMPARE = ("SGD", "Adam", "RAdam", "QHAdam", "Larc", "Lamb", "ranger", "SAdam",
                   "StableAdam")


def _paper_of(fn) -> str:
    """The citations in a recipe's docstring: parentheses holding a year or an arXiv number, then
    any arXiv number not already inside one."""
    doc = " ".join((inspect.getdoc(fn) or "").split())
    cited = re.findall(r"\(([^()]*?(?:\b(?:19|20)\d\d\b|arXiv:)[^()]*)\)", doc)
    arxiv = [a for a in re.findall(r"arXiv:\s*\d{4}\.\d{4,5}", doc)
             if not any(a in c for c in cited)]
    found = "; ".join(dict.fromkeys(cited + arxiv))
    if not found and "notebook" in doc:
        return "unpublished: a researcher's notebook"
    return found or "-"


def recipes_of(module) -> list[tuple[str, Callable]]:
    """The public recipes of a module: the functions in its `__all__` that take an `lr`."""
    found = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name, None)
        if not inspect.isfunction(obj):
            continue
        try:
            params = inspect.signature(inspect.unwrap(obj)).parameters
        except (TypeError, ValueError):
            continue
        if "lr" in params:
            found.append((name, obj))
    return found


def _default_lr(fn) -> float:
    """A recipe's own default learning rate (its reference's), else Adam's of the sweep."""
    default = inspect.signature(inspect.unwrap(fn)).parameters["lr"].default
    if isinstance(default, (int, float)) and not isinstance(default, bool) and default > 0:
        return float(default)
    return next(e.lr for e in _CLASSIC if e.name == "Adam")


def _optional_entries() -> list[Entry]:
    entries = []
    for module_name in OPTIONAL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only the module itself being absent is expected; a broken import inside it is a bug
            # that must show.
            if error.name != module_name:
                raise
            continue
        for name, fn in recipes_of(module):
            lr = _RESEARCH_LR.get(name)
            entries.append(Entry(name, fn, _paper_of(fn), lr=lr if lr is not None else
                                 _default_lr(fn), lr_tuned=lr is not None, module=module_name))
    return entries


@functools.lru_cache(maxsize=None)
def _all() -> dict[str, Entry]:
    entries = {e.name: dataclasses.replace(e, module=classic.__name__) for e in _CLASSIC}
    for entry in _optional_entries():
        if entry.name in entries:
            raise RuntimeError(f"optimizer {entry.name!r} of {entry.module} has the name of a "
                               f"classic one")
        entries[entry.name] = entry
    return entries


def names() -> list[str]:
    """Every registered optimizer name, classic ones first."""
    return list(_all())


def entries() -> list[Entry]:
    return list(_all().values())


class UnknownOptimizer(KeyError):
    def __init__(self, name: str, close: list[str], differs_by: str = ""):
        self.name, self.close = name, close
        if differs_by:
            message = (f"optimizer name {name!r} is ambiguous: {' or '.join(close)} (they differ "
                       f"only by {differs_by}; give one exactly)")
        else:
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            message = f"unknown optimizer {name!r}{hint} (`optcraft list` shows them all)"
        super().__init__(message)

    def __str__(self):
        return self.args[0]


def get(name: str) -> Entry:
    """The entry named `name`: exact, else the one entry whose name matches ignoring case;
    `UnknownOptimizer` names close matches (and the candidates when the case decides, as between
    the classic `Lamb` and the research `LAMB`)."""
    table = _all()
    if name in table:
        return table[name]
    same = [k for k in table if k.lower() == name.lower()]
    if len(same) == 1:
        return table[same[0]]
    if same:
        raise UnknownOptimizer(name, same, "case")
    by_folded = {}
    for k in table:
        by_folded.setdefault(k.lower(), []).append(k)
    close = difflib.get_close_matches(name.lower(), list(by_folded), n=3, cutoff=0.5)
    raise UnknownOptimizer(name, [k for c in close for k in by_folded[c]])


#: Named sets of optimizers for the command line (`optcraft compare --optimizers modern`): the
#: modules whose recipes each holds.
SETS = {
    "classic": ("optcraft.optimizers.classic",),
    "research": ("optcraft.optimizers.research",),
    "torch": ("optcraft.optimizers.torch_family",),
    "modern": ("optcraft.optimizers.modern", "optcraft.optimizers.matrix",
               "optcraft.optimizers.lr_free"),
}


def named_set(name: str) -> list[str] | None:
    """The optimizers of the set `name` (see `SETS`; "all" is every one), or None."""
    if name == "all":
        return names()
    modules = SETS.get(name)
    if modules is None:
        return None
    return [e.name for e in entries() if e.module in modules]


def default_compare() -> list[str]:
    """The default set of `optcraft compare`: the classic ones and two research optimizers."""
    table = _all()
    return [n for n in DEFAULT_COMPARE if n in table]
