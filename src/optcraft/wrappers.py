"""Optimizers around optimizers: `Lookahead`, and `OptimWrapper` (fastai's API over any
torch.optim optimizer).  Both are `torch.optim.Optimizer`s sharing the inner optimizer's
`param_groups` and `state`, so schedulers, hooks and checkpoints see one optimizer."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

import torch

from . import compiler_hints as hints, hypers as hp, precision
from .optimizer import _FastaiAPI
from .tensorlist import TensorList


class _Delegating(_FastaiAPI, torch.optim.Optimizer):
    """A torch optimizer whose groups, state and defaults are those of `self.opt`."""

    def _init_torch_parts(self, opt: torch.optim.Optimizer) -> None:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got "
                            f"{type(opt).__name__}")
        self.opt = opt
        self.frozen_idx = 0
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        hints.register_for_compile(self)

    # torch.optim.Optimizer.__init__ assigns these; here they are the inner optimizer's.
    @property
    def param_groups(self):
        return self.opt.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.opt.param_groups = value

    @property
    def state(self):
        return self.opt.state

    @state.setter
    def state(self, value):
        self.opt.state = value

    @property
    def defaults(self):
        return self.opt.defaults

    @defaults.setter
    def defaults(self, value):
        self.opt.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        self.opt.add_param_group(param_group)

    def _groups(self) -> list[dict]:
        inner = self.opt
        return inner._groups() if isinstance(inner, _FastaiAPI) else vars(inner)["param_groups"]

    def zero_grad(self, *args, **kwargs) -> None:
        self.opt.zero_grad(*args, **kwargs)

    def train(self):
        """The inner optimizer's `train()` (schedule-free's evaluation point), where it has one."""
        inner = getattr(self.opt, "train", None)
        if inner is not None:
            inner()
        return self

    def eval(self):
        """The inner optimizer's `eval()`, where it has one."""
        inner = getattr(self.opt, "eval", None)
        if inner is not None:
            inner()
        return self

    # The hooks a user registers on the wrapper fire around the inner optimizer's own, in torch's
    # order and with torch's return-value rules.
    def state_dict(self) -> dict[str, Any]:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self._state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._patch_step_function()


#: Lookahead's step count in each parameter's state.
COUNT = "lookahead_count"


class Lookahead(_Delegating):
    """Lookahead (Zhang et al., 2019, arXiv:1907.08610): k fast steps of `opt`, then one step back.

    Slow weights `s` start as a copy of the parameters; every `k` steps
    `s <- s + alpha * (p - s)` and `p <- s`.  The slow weights live in the inner optimizer's
    state (`state[p]['slow_weight']`), so they are checkpointed, sharded and moved with it.
    The step count is kept there too (`state[p]['lookahead_count']`, as torch.optim keeps
    `step`): ZeroRedundancyOptimizer's consolidated checkpoints and torch.distributed.checkpoint
    carry per-parameter state only, and a resumed run must synchronise on the same steps.
    """

    def __init__(self, opt: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Lookahead: k must be an integer >= 1, got {k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"Lookahead: alpha must be in [0, 1], got {alpha!r}")
        self._init_torch_parts(opt)
        self.k, self.alpha, self.count = k, float(alpha), 0
        if hasattr(opt, "extra_state"):  # the inner optimizer's checkpoints hold these too
            opt.extra_state = (*opt.extra_state, "slow_weight", COUNT)

    @property
    def hypers(self):
        inner = getattr(self.opt, "hypers", None)
        return inner if inner is not None else [hp.HyperView(g) for g in self.param_groups]

    def _set_hyper(self, k, values):
        for group, v in zip(self.param_groups, values):
            group[k] = v

    def _step(self) -> None:
        # Like torch.optim, a step in which no parameter has a gradient changes nothing.
        if not self._copy_missing_slow_weights():
            return
        self.opt.step()
        self._count_step()
        if self.count % self.k == 0:
            self._synchronise()

    def _count_step(self) -> None:
        self.count += 1
        for group in self.param_groups:
            for p in group["params"]:
                if "slow_weight" in self.state[p]:
                    self.state[p][COUNT] = self.count

    @torch.no_grad()
    def _copy_missing_slow_weights(self) -> bool:
        """Start the slow weights of parameters seen with a gradient for the first time; return
        whether any parameter has a gradient."""
        any_grad = False
        # The count in the state is the one to go on: a state loaded from outside (ZeRO, DCP)
        # does not pass through `load_state_dict`.
        recorded = [self.state[p][COUNT] for group in self.param_groups
                    for p in group["params"] if COUNT in self.state.get(p, ())]
        if recorded:
            self.count = max(recorded)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                any_grad = True
                if "slow_weight" not in self.state[p]:
                    # float32 for half-precision parameters, like their master copies
                    dtype = torch.float32 if p.dtype in precision.LOW_PRECISION else p.dtype
                    self.state[p]["slow_weight"] = p.detach().to(dtype, copy=True)
        return any_grad

    @torch.no_grad()
    def _synchronise(self) -> None:
        by_kind: dict[tuple, tuple[list, list, list]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if "slow_weight" not in st:  # never had a gradient: nothing to average
                    continue
                # The fast weights are the master copy where the inner optimizer keeps one.
                fast = st.get(precision.MASTER, p)
                slow_list, fast_list, params = by_kind.setdefault(
                    (p.device, fast.dtype, fast is p), ([], [], []))
                # complex tensors as their real views, as the engine runs them
                slow_list.append(_real(st["slow_weight"].to(fast.dtype)))
                fast_list.append(_real(fast))
                params.append(p)
        for (_, _, is_param), (slow, fast, params) in by_kind.items():
            TensorList(slow).lerp_(fast, self.alpha)
            TensorList(fast).copy_(slow)
            if not is_param:
                precision.write_back(params, fast)
            for p, s in zip(params, slow):
                if _real(self.state[p]["slow_weight"]).data_ptr() != s.data_ptr() or \
                        _real(self.state[p]["slow_weight"]).dtype != s.dtype:
                    _real(self.state[p]["slow_weight"]).copy_(s)

    def clear_state(self) -> None:
        clear = getattr(self.opt, "clear_state", None)
        if clear is not None:
            clear()
        else:
            for p in list(self.state):
                self.state[p] = {}
        self.count = 0

    def _state_dict(self) -> dict[str, Any]:
        sd = self.opt.state_dict()
        sd["lookahead"] = {"count": self.count, "k": self.k, "alpha": self.alpha}
        return sd

    def _load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        # torch.distributed.checkpoint keeps no entries but 'state' and 'param_groups': the count
        # is then the one in the parameters' state.
        extra = state_dict.pop("lookahead", None)
        if extra is not None and (not isinstance(extra, dict) or "count" not in extra):
            raise ValueError("not a Lookahead state dict: its 'lookahead' entry has no 'count'")
        self.opt.load_state_dict(state_dict)
        recorded = [st[COUNT] for st in self.state.values() if COUNT in st]
        self.count = int(extra["count"]) if extra is not None else max(recorded, default=0)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}) of {self.opt!r}"


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


# ---- OptimWrapper ----------------------------------------------------------------------------

#: torch's group names -> fastai's (tuples are flattened as name__i by detuplify_pg).
pytorch_hp_map = {"momentum": "mom", "weight_decay": "wd", "alpha": "sqr_mom",
                  "betas__0": "mom", "betas__1": "sqr_mom"}

#: torch's execution switches: options of the implementation, not hyperparameters.
_EXECUTION_FLAGS = ("foreach", "fused", "differentiable", "capturable", "maximize",
                    "decoupled_weight_decay", "amsgrad", "centered")


def detuplify_pg(d: dict) -> dict:
    """A param group's hyperparameters with tuples flattened: `betas` -> `betas__0`, `betas__1`."""
    res = {}
    for k, v in d.items():
        if k in ("params", "param_names"):
            continue
        if isinstance(v, (list, tuple)):
            res.update({f"{k}__{i}": v_ for i, v_ in enumerate(v)})
        else:
            res[k] = v
    return res


def set_item_pg(pg: dict, k: str, v) -> dict:
    """Set `k` in param group `pg`, where `name__i` sets item i of the tuple `name`."""
    if "__" not in k:
        pg[k] = v
    else:
        name, idx = k.split("__")
        pg[name] = tuple(v if i == int(idx) else pg[name][i] for i in range(len(pg[name])))
    return pg


class OptimWrapper(_Delegating):
    """fastai's API (`hypers` with fastai's names, `set_hyper`, `param_lists`, `freeze_to`) over
    any torch.optim optimizer.  `hp_map` maps torch's names (flattened by `detuplify_pg`) to
    fastai's; the default maps momentum/betas__0 to mom, betas__1/alpha to sqr_mom and
    weight_decay to wd.  The groups are used as they are (never one group per parameter)."""

    def __init__(self, opt: torch.optim.Optimizer, hp_map: dict | None = None):
        self._init_torch_parts(opt)
        if hp_map is None:
            hp_map = pytorch_hp_map
        keys = detuplify_pg(opt.param_groups[0]).keys()
        self.fwd_map = {k: hp_map.get(k, k) for k in keys}
        self.bwd_map = {v: k for k, v in self.fwd_map.items()}

    @property
    def hypers(self) -> list[dict]:
        return [{self.fwd_map.get(k, k): v for k, v in detuplify_pg(pg).items()
                 if k not in _EXECUTION_FLAGS}
                for pg in self.param_groups]


    def set_hypers(self, **kwargs) -> None:
        # Names here are fastai's as mapped by hp_map, not translated through torch aliases.
        spread = {k: self._spread_and_check(k, v) for k, v in kwargs.items()}
        for k, v in spread.items():
            self._set_hyper(k, v)

    def _set_hyper(self, k, values) -> None:
        for pg, v in zip(self.param_groups, values):
            set_item_pg(pg, self.bwd_map[k], v)

    def step(self, closure: Callable | None = None):
        return self.opt.step(closure)

    def clear_state(self) -> None:
        for p in list(self.opt.state):
            self.opt.state[p] = {}

    def _state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def _load_state_dict(self, state_dict: dict) -> None:
        self.opt.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"OptimWrapper of {self.opt!r}"
