"""Routing: one optimizer that runs different chains on different parameters.

    opt = oc.route(model.named_parameters(),
                   oc.part(oc.SGD, where=oc.by_ndim(2), lr=0.1, mom=0.9),
                   oc.part(oc.Adam, lr=1e-3))

Each `part` is a named optimizer (a recipe) with its own keyword arguments and a `where`, the
parameters it takes: a predicate on the tensor (`optcraft.predicates`: `by_ndim`, `by_name`, any
callable `tensor -> bool`), or None for every parameter no earlier part took.  A parameter goes
to the first part that takes it; every parameter must go somewhere.

The result is one `optcraft.Optimizer` (optax's `partition`, heavyball's routing, as torch users
need it): one `state_dict`, one `param_groups` list that torch's schedulers and `set_hyper`
reach, one `step()`.  Each of the user's groups is split by part, in the parts' order, into
groups that name their chain (`group["chain"]`, the part's name) and hold the part's
hyperparameters (the user's group values win over the part's).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .optimizer import Optimizer, _as_groups, _is_named

__all__ = ["Part", "part", "route"]


class Part:
    """A named optimizer for the parameters `where` accepts (see `route`)."""

    def __init__(self, recipe: Callable, where: Callable | None = None, name: str | None = None,
                 **hypers: Any):
        if not callable(recipe):
            raise TypeError(f"part: the recipe must be a named optimizer (oc.Adam, ...), got "
                            f"{recipe!r}")
        if where is not None and not callable(where):
            raise TypeError(f"part: where must be a predicate (tensor -> bool) or None, got "
                            f"{where!r}")
        self.recipe, self.where, self.hypers = recipe, where, hypers
        self.name = name or getattr(recipe, "__name__", "part").lower()

    def takes(self, p: torch.Tensor) -> bool:
        return self.where is None or bool(self.where(p))

    def __repr__(self) -> str:
        where = f", where={self.where!r}" if self.where is not None else ""
        return f"part({getattr(self.recipe, '__name__', self.recipe)}{where})"


def part(recipe: Callable, where: Callable | None = None, name: str | None = None,
         **hypers: Any) -> Part:
    """A `Part` of a routed optimizer: `recipe` (a named optimizer) with its keyword arguments,
    for the parameters `where` accepts; `name` names its chain (default: the recipe's name)."""
    return Part(recipe, where, name, **hypers)


def route(params, *parts: Part, impl: str = "auto", master_weights: bool = True,
          state_bits: int | None = None, rounding: str | None = None) -> Optimizer:
    """One optimizer running each part's chain on the parameters routed to it (see the module
    docstring); `impl`, `master_weights`, `state_bits` and `rounding` are the whole optimizer's
    (see `optcraft.Optimizer`)."""
    if not parts or not all(isinstance(p, Part) for p in parts):
        raise TypeError("route: give the parameters, then one or more oc.part(recipe, where=...)")
    names = [p.name for p in parts]
    for i, p in enumerate(parts):  # two parts of one recipe: name them apart
        if names.count(p.name) > 1:
            names[i] = f"{p.name}{names[:i].count(p.name) + 1}"
    groups = _as_groups(params)
    routed: list[list[dict]] = [[] for _ in parts]
    for gi, group in enumerate(groups):
        items = group["params"]
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        taken: list[list] = [[] for _ in parts]
        for item in items:
            tensor = item[1] if _is_named(item) else item
            for pi, p in enumerate(parts):
                if p.takes(tensor):
                    taken[pi].append(item)
                    break
            else:
                label = item[0] if _is_named(item) else f"of shape {tuple(tensor.shape)}"
                raise ValueError(f"route: parameter {label} (group {gi}) goes to no part; end "
                                 f"with a part without `where` to take the rest")
        for pi, chosen in enumerate(taken):
            if chosen:
                routed[pi].append({**{k: v for k, v in group.items() if k != "params"},
                                   "params": chosen})
    chains, all_groups, fixed = {}, [], {}
    for name, p, own in zip(names, parts, routed):
        if not own:
            continue
        opt = p.recipe(own, impl=impl, master_weights=master_weights, **p.hypers)
        if not isinstance(opt, Optimizer):
            raise TypeError(f"route: part {name!r} made a {type(opt).__name__}; a part must be a "
                            f"named optimizer whose recipe returns an optcraft Optimizer (wrap "
                            f"the routed optimizer instead: Lookahead(route(...)))")
        chains[name] = opt.cbs
        fixed.update(getattr(opt, "fixed_args", {}))
        for g in opt.param_groups:
            all_groups.append({**g, "chain": name})
    if not all_groups:
        raise ValueError("route: no parameters")
    storage = {k: v for k, v in (("state_bits", state_bits), ("rounding", rounding))
               if v is not None}
    opt = Optimizer(all_groups, chains, impl=impl, master_weights=master_weights, **storage)
    opt.fixed_args, opt.recipe_name = fixed, "route"
    return opt

