"""`Optimizer`: a real `torch.optim.Optimizer` whose algorithm is a chain of building blocks (or
several chains, each running on the parameters routed to it), with fastai's API (`hypers`,
`param_lists`, `set_hyper`, `freeze_to`, `clear_state`) as a view over torch's `param_groups`
and `state`."""
from __future__ import annotations

import copy
import numbers
import warnings
from collections import defaultdict
from itertools import chain
from typing import Any, Callable, Iterable

import torch

from . import compiler_hints as hints, engine, hypers as hp, state_codecs
from .blocks.base import callback_name
from .engine import Chain
from .schedules import is_schedule

#: The name of an optimizer's chain when it has only one.
MAIN = "main"


class _FastaiAPI:
    """fastai's `_BaseOptimizer`: what `Optimizer` and `OptimWrapper` share, over
    `self.param_groups` (torch's list of dicts) and `self.state`."""

    def all_params(self, n=slice(None), with_grad=False):
        """(param, group, state, hypers) for the groups selected by `n`."""
        lists, hyps = self.param_lists[n], self.hypers[n]
        found = [(p, pg, self.state[p], h) for pg, h in zip(lists, hyps) for p in pg]
        return [o for o in found if o[0].grad is not None] if with_grad else found

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Run the chain on every parameter with a gradient; return the closure's loss.

        Under `torch.compile` (dynamo) the step is one operation of the compiled graph, run as it
        runs eagerly (see `compiler_hints.step_as_one_operation`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            hints.step_as_one_operation(self, [p for g in self._groups() for p in g["params"]])
        else:
            self._step()
        return loss

    def _groups(self) -> list[dict]:
        """`self.param_groups`, read so that dynamo can trace it: dynamo's view of a torch
        optimizer's `param_groups` attribute takes each group for a plain dict, and ours answer
        to torch's names too (`hypers.ParamGroup`)."""
        return vars(self)["param_groups"]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        hints.register_for_compile(self)

    def _set_require_grad(self, rg, p, pg, state, h):
        p.requires_grad_(rg or bool(state.get("force_train", False)))

    def freeze_to(self, n: int) -> None:
        """Freeze the parameter groups before `n` (parameters with `force_train=True` in their
        state keep training); unfreeze the others."""
        n_groups = len(self.param_lists)
        self.frozen_idx = n if n >= 0 else n_groups + n
        if self.frozen_idx >= n_groups:
            warnings.warn(f"Freezing {self.frozen_idx} groups; model has {n_groups}; whole model "
                          f"is frozen.", stacklevel=2)
        for o in self.all_params(slice(n, None)):
            self._set_require_grad(True, *o)
        for o in self.all_params(slice(None, n)):
            self._set_require_grad(False, *o)

    def freeze(self) -> None:
        """Freeze every group but the last."""
        if len(self.param_lists) < 2:
            raise ValueError("freeze() needs at least two parameter groups (it trains only the "
                             "last); use freeze_to(n) to freeze explicitly")
        self.freeze_to(-1)

    def set_freeze(self, n: int, rg: bool, ignore_force_train: bool = False) -> None:
        """Set `requires_grad` to `rg` for group `n` only."""
        for p in self.param_lists[n]:
            force = self.state[p].get("force_train", False) and not ignore_force_train
            p.requires_grad_(rg or bool(force))

    def unfreeze(self) -> None:
        self.freeze_to(0)

    def _refuse_fixed(self, values: dict, where: str) -> None:
        """ValueError for an argument that chose the chain at construction (see
        `hypers.torch_names`) given another value: it cannot be given per group or changed
        later (the same value again is harmless: ZeroRedundancyOptimizer repeats its keyword
        arguments in every group)."""
        inner = getattr(self, "opt", self)
        fixed = getattr(inner, "fixed_args", None) or {}
        for name, value in values.items():
            if name in fixed and not hp.same_value(value, fixed[name]):
                raise ValueError(hp.fixed_message(inner.recipe_name or "the optimizer", name,
                                                  where))

    @property
    def param_lists(self) -> list[list[torch.Tensor]]:
        return [g["params"] for g in self.param_groups]

    @param_lists.setter
    def param_lists(self, lists) -> None:
        lists = [list(l) for l in lists]
        if len(lists) != len(self.param_groups):
            raise ValueError(f"got {len(lists)} parameter lists for {len(self.param_groups)} groups")
        for group, params in zip(self.param_groups, lists):
            group["params"] = params

    def set_hypers(self, **kwargs) -> None:
        """`set_hyper` for every keyword; all are checked before any is set."""
        kwargs = hp.canonical_names(kwargs)
        spread = {k: self._spread_and_check(k, v) for k, v in kwargs.items()}
        for k, v in spread.items():
            self._set_hyper(k, v)

    def set_hyper(self, k: str, v) -> None:
        """Set hyperparameter `k` to `v`: a scalar, one value per group, or a slice."""
        self.set_hypers(**{k: v})

    def _spread_and_check(self, k, v) -> list:
        self._refuse_fixed({k: v}, "set_hyper")
        hp.check_known(k, {name for h in self.hypers for name in h})
        values = hp.spread(k, v, len(self.param_lists))
        step = getattr(self, "schedule_step", 0)
        for i, value in enumerate(values):
            hp.validate(k, hp.current_value(value, step), i)
        return values


class Optimizer(_FastaiAPI, torch.optim.Optimizer):
    """An optimizer made of a chain of callbacks (fastai's design), that is a `torch.optim.Optimizer`.

    Args:
        params: tensors (one group), a list of lists of tensors (a group each), torch's list of
            dicts, or `named_parameters()`.
        cbs: a callable or a list of them, run in order for every parameter with a gradient at
            each `step()`: optcraft's blocks run over whole buckets at once; a plain fastai callback
            `cb(p, **{**state, **hypers})` runs per parameter.  Each may carry `defaults`.  Or a
            dict of such chains by name, several chains in one optimizer: each group then names
            the chain it runs in its `"chain"` entry (`optcraft.routing.route` makes such groups
            from predicates or names, and named recipes).
        train_bn: kept for fastai compatibility (used by fastai's Learner, not here).
        impl: "auto", "reference", "foreach", "fused" or "compiled" (see `optcraft.engine`).
        master_weights: for float16/bfloat16 parameters, run the chain on a float32 master copy
            with float32 state (default), or on the parameter itself (False; torch's behaviour).
            See `optcraft.precision`.
        state_bits: 32 (default), 16 (bfloat16), 8 or 4 (block-wise quantised): how the state
            the blocks declare like the parameter is stored between steps; see
            `optcraft.state_codecs`.  An attribute: set later, it takes effect at the next step.
        rounding: "stochastic" (default) or "nearest": how a float32 result is written into
            half-precision storage that has no float32 copy (parameters with
            `master_weights=False`, bfloat16 state); see `optcraft.state_codecs`.
        **defaults: hyperparameters, overriding the callbacks' defaults; a scalar, a list with one
            value per group, or a slice (see `set_hyper`).  torch's names `betas`, `momentum` and
            `weight_decay` are accepted for `(mom, sqr_mom)`, `mom` and `wd`.
    """

    # fastai keeps force_train and do_wd; do_trust_ratio is optcraft.optax.lars's mask, a flag alike.
    _keep_on_clear = ("force_train", "do_wd", "do_trust_ratio")
    #: Per-parameter state entries kept by something around the chain (a wrapper such as
    #: Lookahead adds its own): `load_state_dict` accepts them besides the chain's.
    extra_state: tuple[str, ...] = ()

    def __init__(self, params, cbs, train_bn: bool = True, impl: str = "auto",
                 master_weights: bool = True, state_bits: int = 32, rounding: str | None = None,
                 capturable: bool = False, **defaults):
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        self.capturable = capturable
        self.chains = _as_chains(cbs, capturable)
        # The arguments a named recipe turned into the chain (set by `hypers.torch_names`).
        self.fixed_args, self.recipe_name = {}, None
        self.train_bn, self.frozen_idx = train_bn, 0
        self.extra_state = ()  # (see the class attribute)
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be True or False, got {master_weights!r}")
        self.master_weights = master_weights
        state_codecs.check(state_bits, rounding)
        self.state_bits, self.rounding = state_bits, rounding
        # Per group: the schedules (name -> callable) and the values last written from them.
        self.schedule_step, self._schedules, self._written = 0, [], []
        self.impl = engine.check_impl(impl)
        for chain in self.chains.values():
            engine.resolve(self.impl, chain)  # "fused" without a torch kernel fails here
        # Group dicts in torch's names (`weight_decay`, as the Hugging Face Trainer makes them)
        # are translated before the defaults fill them, so the two spellings never meet.
        groups = [hp.canonical_names(g, f"parameter group {i}: ")
                  for i, g in enumerate(_as_groups(params))]
        for i, group in enumerate(groups):
            self._check_chain_name(group, i)
        overrides = hp.canonical_names(defaults)
        # The names given as hyperparameters (keywords, the blocks' defaults): a named recipe's
        # other arguments chose the chain (`hypers.torch_names`).
        self._hyper_names = frozenset(overrides).union(
            *(chain.defaults for chain in self.chains.values()))
        self._check_names(overrides)
        per_group = {k: hp.spread(k, v, len(groups)) for k, v in overrides.items()}
        for i, group in enumerate(groups):
            for k, values in per_group.items():
                group.setdefault(k, values[i])
            for k, v in self._chain_of(group).defaults.items():
                group.setdefault(k, v)
        # A group added later with add_param_group gets the last group's values.
        last = {k: v for k, v in groups[-1].items() if k not in engine.HIDDEN_GROUP_KEYS} \
            if groups else {}
        # The groups are whole here: torch's __init__ adds them one by one, and no group takes
        # another's values (a key given in one group only stays in that group).
        self._building = True
        try:
            super().__init__(groups, hp.ParamGroup(last))
        finally:
            self._building = False
        hints.register_for_compile(self)

    def _check_names(self, names) -> None:
        """ValueError, naming the nearest known name, for a hyperparameter no block of the chains
        takes (`mom_sqr=0.9`), instead of storing it unused.  Known: the blocks' hyperparameters
        (`Chain.defaults`), `lr`, and the per-parameter flags blocks read; not checked where a
        chain holds a plain callback (its keywords are not declared)."""
        if any(spec is None for chain in self.chains.values() for spec, _ in chain.specs):
            return
        known = {"lr", *self._keep_on_clear}
        for chain in self.chains.values():
            known |= set(chain.defaults)
            for cb, (spec, _) in zip(chain.cbs, chain.specs):
                known |= set(spec.hypers) | set(spec.static) | set(spec.switches)
                known |= _keywords_of(cb) - {"p"} - set(chain.kept) - chain.transient - \
                    set(chain.group_state) - chain.summed
        for name in names:
            hp.check_known(name, known)

    # ---- the chains --------------------------------------------------------------------------
    @property
    def cbs(self) -> list:
        """The chain's callbacks (of the main chain when the optimizer routes to several)."""
        return self.chains[MAIN].cbs if MAIN in self.chains else \
            next(iter(self.chains.values())).cbs

    @property
    def chain(self) -> Chain:
        return self.chains[MAIN] if MAIN in self.chains else next(iter(self.chains.values()))

    def _chain_name(self, group: dict) -> str:
        return group.get("chain", MAIN) if len(self.chains) > 1 else next(iter(self.chains))

    def _chain_of(self, group: dict) -> Chain:
        return self.chains[self._chain_name(group)]

    def _check_chain_name(self, group: dict, i: int) -> None:
        name = group.get("chain")
        if len(self.chains) > 1 and name not in self.chains:
            raise ValueError(f"parameter group {i}: this optimizer runs the chains "
                             f"{', '.join(map(repr, self.chains))}; each group names one in its "
                             f"'chain' entry, got {name!r}")
        if len(self.chains) == 1 and name is not None and name not in self.chains:
            raise ValueError(f"parameter group {i}: 'chain' is {name!r}, but this optimizer has "
                             f"one chain, {next(iter(self.chains))!r}")

    @property
    def path(self) -> engine.Path:
        """The execution path object that runs the (main) chain: `opt.path.name` is the path
        `impl` resolved to; the compiled path's counts its compiles (`opt.path.compiles`)."""
        paths = self._paths()
        return paths[MAIN] if MAIN in paths else next(iter(paths.values()))

    def _paths(self) -> dict[str, engine.Path]:
        """The execution path of each chain, made once (compiled functions are per optimizer and
        not part of its pickled state)."""
        paths = self.__dict__.get("_path_objects")
        if paths is None:
            paths = self.__dict__["_path_objects"] = {
                name: engine.path_for(self.impl, chain) for name, chain in self.chains.items()}
        return paths

    # ---- torch's contract ------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        where = f"parameter group {len(self.param_groups)}: "
        group = hp.ParamGroup(hp.canonical_names(param_group, where))
        self._refuse_fixed(group, f"parameter group {len(self.param_groups)}")
        self._check_chain_name(group, len(self.param_groups))
        same_chain = [g for g in self.param_groups
                      if self._chain_name(g) == self._chain_name(group)]
        if same_chain and not self.__dict__.get("_building", False):
            for k, v in same_chain[-1].items():  # a group added later: the last one's values
                if k not in engine.HIDDEN_GROUP_KEYS:
                    group.setdefault(k, v)
        for k, v in self._chain_of(group).defaults.items():
            group.setdefault(k, v)
        schedules = {k: v for k, v in group.items() if k not in engine.HIDDEN_GROUP_KEYS
                     and is_schedule(v)}
        for k, schedule in schedules.items():
            group[k] = schedule(self.schedule_step)
        hp.validate_group(group, len(self.param_groups))
        params = group.get("params")
        if params is None:
            raise ValueError(f"{where}no 'params'")
        group["params"] = [params] if isinstance(params, torch.Tensor) else \
            (params if isinstance(params, set) else list(params))
        tensors = [p[1] if _is_named(p) else p for p in group["params"]]
        for p in tensors:
            if isinstance(p, torch.Tensor) and p.is_sparse:
                raise ValueError(f"{where}sparse parameters are not supported")
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError(f"{where}a parameter appears more than once in the group")
        super().add_param_group(group)
        self._schedules.append(schedules)
        self._written.append({k: group[k] for k in schedules})

    @property
    def hypers(self) -> list[hp.HyperView]:
        """fastai's view: one dict of hyperparameters per group (live: writes go to param_groups)."""
        return [hp.HyperView(g) for g in self.param_groups]

    @hypers.setter
    def hypers(self, values: list[dict]) -> None:
        if len(values) != len(self.param_groups):
            raise ValueError(f"got hyperparameters for {len(values)} groups, the optimizer has "
                             f"{len(self.param_groups)}")
        new = [hp.canonical_names(dict(v), f"parameter group {i}: ") for i, v in enumerate(values)]
        for i, v in enumerate(new):
            hp.validate_group(v, i)
        for group, v in zip(self.param_groups, new):
            params = {k: group[k] for k in engine.HIDDEN_GROUP_KEYS if k in group}
            group.clear()
            group.update(params, **v)

    def _set_hyper(self, k, values) -> None:
        """Set `k` in every group; a schedule is installed, a value removes the schedule."""
        for group, schedules, written, v in zip(self.param_groups, self._schedules,
                                                self._written, values):
            if is_schedule(v):
                schedules[k] = v
                v = written[k] = v(self.schedule_step)
            else:
                schedules.pop(k, None)
                written.pop(k, None)
            group[k] = v

    def _apply_schedules(self) -> None:
        """Write every schedule's value for this step into param_groups (see optcraft.schedules):
        every value is worked out and checked first, then all are written, so a schedule that
        fails leaves every group as it was."""
        pending = []
        for i, (group, schedules, written) in enumerate(zip(self.param_groups, self._schedules,
                                                            self._written)):
            for k, schedule in schedules.items():
                if k in written and group.get(k) is not written[k] and group.get(k) != written[k]:
                    warnings.warn(f"{k} (parameter group {i}) was changed from outside the "
                                  f"optimizer, but it follows a schedule, which owns it: the "
                                  f"schedule's value is used. Use set_hyper({k!r}, value) to drop "
                                  f"the schedule.", stacklevel=4)
                value = schedule(self.schedule_step)
                hp.validate(k, value, i)
                pending.append((group, written, k, value))
        for group, written, k, value in pending:
            group[k] = written[k] = value

    def set_capturable(self, capturable: bool) -> None:
        """Keep the numbers the chains count (the step count) on the parameters' device, once per
        group, written in place (`capturable=True`), so that a step can be captured in a CUDA
        graph and replayed (see `engine.chain.on_device`), or as Python numbers per parameter
        (False, the default).  Chosen before the first step: the state kept differs."""
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        if capturable == self.capturable:
            return
        if any(self.state.values()):
            raise RuntimeError("capturable is chosen before the optimizer's first step (its "
                               "state is kept otherwise); build the optimizer with "
                               "capturable=True")
        chains = {name: Chain(chain.given, capturable) for name, chain in self.chains.items()}
        for chain in chains.values():
            engine.resolve(self.impl, chain)  # (a counted chain has no fused kernel: refused)
        self.capturable, self.chains = capturable, chains
        self.__dict__.pop("_path_objects", None)

    @torch.no_grad()
    def _step(self) -> None:
        """The step itself: the chain on every parameter with a gradient."""
        codec = self._codec()
        for chain, path, groups in self._begin_step():
            # (`partition_group`: set by `optcraft.distributed.partitioned` under
            # ZeroRedundancyOptimizer, whose ranks each hold a share of the parameters)
            engine.step(chain, path, groups, self.state, self.master_weights, codec,
                        getattr(self, "partition_group", None))
        self._end_step()

    def _begin_step(self) -> list:
        """The host's part of a step before its arithmetic: the schedules' values written
        (all checked before any is), the groups checked, and each chain with its path and
        groups."""
        self._recorded_schedule_step()
        self._apply_schedules()
        self._check_before_step()
        paths = self._paths()
        runs = []
        for name, chain in self.chains.items():
            groups = [g for g in self.param_groups if self._chain_name(g) == name]
            if groups:
                runs.append((chain, paths[name], groups))
        return runs

    def _end_step(self) -> None:
        """The host's part of a step after its arithmetic: the step count schedules see, also
        kept in each group's state while schedules are set (see `_recorded_schedule_step`)."""
        self.schedule_step += 1
        keep = any(self._schedules)
        for group in self.param_groups:
            if keep or "schedule_step" in group.get(engine.GROUP_STATE, ()):
                group.setdefault(engine.GROUP_STATE, {})["schedule_step"] = self.schedule_step

    def _recorded_schedule_step(self) -> None:
        """While schedules are set, each group keeps the step count they see in its own state,
        where ZeroRedundancyOptimizer's and DCP's checkpoints (which keep only `state` and
        `param_groups`, and do not always load through `load_state_dict`) carry it: the count
        found there is the one to go on."""
        recorded = [g[engine.GROUP_STATE]["schedule_step"] for g in self.param_groups
                    if isinstance(g.get(engine.GROUP_STATE, {}).get("schedule_step"), int)]
        if recorded:
            self.schedule_step = max(recorded)

    def _codec(self) -> state_codecs.StateCodec:
        """How the state is stored (`state_bits`, `rounding`: see `optcraft.state_codecs`)."""
        return state_codecs.StateCodec(getattr(self, "state_bits", 32),
                                       getattr(self, "rounding", None))

    def _check_before_step(self) -> None:
        for i, group in enumerate(self.param_groups):
            self._refuse_fixed(group, f"parameter group {i}")
            hp.validate_group(hp.HyperView(group), i, read=False)  # (no device read)
            if self._chain_of(group).eval_points and \
                    not engine.group_state_of(group, self._chain_of(group)).get("train_mode", True):
                raise RuntimeError(f"parameter group {i}: the optimizer is in eval mode "
                                   f"(opt.eval()); call opt.train() before opt.step()")
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"parameter group {i}: a parameter has a sparse gradient; "
                                       f"optcraft's optimizers take dense gradients only")

    # ---- the evaluation point ------------------------------------------------------------------
    @torch.no_grad()
    def train(self) -> "Optimizer":
        """Put the parameters at the point the optimizer trains at (schedule-free's `y`); a no-op
        for chains that evaluate where they train.  Call it before training steps, after
        `eval()`."""
        return self._set_mode(True)

    @torch.no_grad()
    def eval(self) -> "Optimizer":
        """Put the parameters at the point the optimizer is evaluated at (schedule-free's `x`);
        call it before evaluating or saving the model, and `train()` before the next step."""
        return self._set_mode(False)

    def _set_mode(self, training: bool) -> "Optimizer":
        for group in self.param_groups:
            chain = self._chain_of(group)
            if not chain.eval_points:
                continue
            kept = engine.group_state_of(group, chain)
            if kept.get("train_mode", True) == training:
                continue
            hyper = engine._plain_scalars(engine.hypers_of(group))
            for spec, bound in chain.eval_points:
                move = spec.eval_point[0 if not training else 1]
                for p in group["params"]:
                    st = self.state.get(p)
                    if not st:
                        continue  # never stepped: the two points are the same
                    engine.move_to_point(move, p, st, {**kept, **hyper, **bound},
                                         self.master_weights, chain.kept)
            kept["train_mode"] = training
        return self

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient in place (fastai's behaviour), or set them to None
        (`set_to_none=True`, torch's default)."""
        for group in self._groups():  # (traceable by dynamo: see `_groups`)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    def clear_state(self) -> None:
        """Forget all state but the per-parameter flags (`force_train`, `do_wd`, `do_trust_ratio`),
        the groups' own state included: the optimizer starts afresh from the parameters as they
        are (in eval mode, from the evaluation point), in train mode."""
        for p, *_ in self.all_params():
            kept = {k: self.state[p][k] for k in self._keep_on_clear if k in self.state[p]}
            self.state[p] = kept
        for group in self.param_groups:
            group.pop(engine.GROUP_STATE, None)

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's format, plus `schedule_step` (the step count schedules see).  The groups' own
        state (`group_state`) is in `param_groups`, where ZeroRedundancyOptimizer's consolidated
        checkpoints and torch.distributed.checkpoint keep it; so is `schedule_step` while a
        schedule is set."""
        sd = super().state_dict()
        for group in sd["param_groups"]:  # (a later step writes the live group's own dict)
            if engine.GROUP_STATE in group:
                group[engine.GROUP_STATE] = dict(group[engine.GROUP_STATE])
        sd["schedule_step"] = self.schedule_step
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch's state-dict format; everything is checked before anything changes, and a
        state dict that does not fit (groups, parameter counts, state shapes, hyperparameters)
        raises ValueError."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups = _checked_state(self, state_dict)
        from_groups = [g.get(engine.GROUP_STATE, {}).get("schedule_step") for g in groups]
        schedule_step = state_dict.get("schedule_step", max(
            [s for s in from_groups if isinstance(s, int)], default=0))
        if isinstance(schedule_step, bool) or not isinstance(schedule_step, int) or \
                schedule_step < 0:
            raise ValueError(f"schedule_step must be an integer >= 0, got {schedule_step!r}")
        self.state = state
        self.param_groups = groups
        self.schedule_step = schedule_step
        self._written = [{k: g[k] for k in sched if k in g}
                         for g, sched in zip(groups, self._schedules)]
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        extra = {k: self.__dict__[k]
                 for k in ("train_bn", "frozen_idx", "impl", "master_weights", "fixed_args",
                           "recipe_name", "schedule_step", "_schedules", "_written",
                           "state_bits", "rounding", "capturable") if k in self.__dict__}
        extra["extra_state"] = self.extra_state
        # The callbacks are pickled; each `Chain` is worked out from them again.
        chains = {name: chain.given for name, chain in self.chains.items()}
        return {**super().__getstate__(), **extra, "chains": chains}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["chains"] = _as_chains(state["chains"], state.get("capturable", False))
        super().__setstate__(state)  # (also registers it for compiled graphs)
        # torch adds this flag on unpickling; it is not a hyperparameter of ours.
        dict.pop(self.defaults, "differentiable", None)

    def __repr__(self) -> str:
        text = torch.optim.Optimizer.__repr__(self)
        if len(self.chains) == 1:
            return f"{text}\nchain: {self.chain!r}"
        return text + "".join(f"\nchain {name!r}: {chain!r}" for name, chain in self.chains.items())


def _keywords_of(cb) -> set[str]:
    """The named keyword arguments a block's function takes (what it reads from the group)."""
    import inspect

    from .blocks.base import unwrap_partial

    fn, _ = unwrap_partial(cb)
    fn = inspect.unwrap(fn)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)}


def _as_callbacks(cbs) -> list:
    items = list(cbs) if isinstance(cbs, (list, tuple)) else [cbs]
    for cb in items:
        if not callable(cb):
            raise TypeError(f"cbs: every callback must be callable, got {type(cb).__name__} {cb!r}")
    return items


def _as_chains(cbs, capturable: bool = False) -> dict[str, Chain]:
    """One chain (named `MAIN`), or several by name."""
    if isinstance(cbs, dict):
        if not cbs:
            raise ValueError("cbs: give at least one chain")
        for name in cbs:
            if not isinstance(name, str):
                raise TypeError(f"cbs: chains are named by strings, got {name!r}")
        return {name: Chain(_as_callbacks(chain), capturable) for name, chain in cbs.items()}
    return {MAIN: Chain(_as_callbacks(cbs), capturable)}


def _is_named(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def _as_groups(params) -> list[dict]:
    """fastai's and torch's ways of giving parameters, as a list of torch group dicts."""
    if isinstance(params, torch.Tensor):
        return [{"params": [params]}]
    if isinstance(params, dict):
        raise TypeError("params: give an iterable of tensors, of lists of tensors, or of dicts "
                        "(torch's param groups), not a dict")
    items = list(params)
    if not items:
        raise ValueError("params: empty parameter list")
    if isinstance(items[0], dict):
        if not all(isinstance(g, dict) for g in items):
            raise TypeError("params: a list of param-group dicts may hold only dicts")
        return [dict(g) for g in items]
    nested = [not isinstance(o, torch.Tensor) and not _is_named(o) and _is_iterable(o) for o in items]
    if any(nested):
        if not all(nested):
            raise TypeError("params: mix of tensors and lists of tensors; give either one list of "
                            "tensors (one group) or a list of lists (a group each)")
        groups = [{"params": list(o)} for o in items]
        for i, g in enumerate(groups):
            if not g["params"]:
                raise ValueError(f"params: parameter group {i} is empty")
        return groups
    return [{"params": items}]


def _is_iterable(o) -> bool:
    try:
        iter(o)
        return True
    except TypeError:
        return False


def _state_dtype(opt, p: torch.Tensor) -> torch.dtype:
    """The dtype the chain keeps a parameter's floating-point state in: float32 for a half-
    precision parameter on master weights, else the parameter's own (as torch.optim casts)."""
    from .precision import uses_master

    return torch.float32 if uses_master(p.dtype, getattr(opt, "master_weights", True)) else p.dtype


def _checked_state(opt: torch.optim.Optimizer, state_dict: dict):
    """The (state, param_groups) that `state_dict` gives `opt`, or ValueError; changes nothing.

    What each state entry must be comes from the blocks' specifications (`blocks.base.Spec`): a
    tensor entry has the shape its rule gives the parameter (the parameter's, a row statistic's,
    a factor's), and a parameter that holds some of the entries its chain always keeps must hold
    them all (a truncated checkpoint).  Floating-point tensors are cast to the dtype the chain
    keeps them in, as torch.optim does."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or \
            "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    groups = opt.param_groups
    if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(s, dict)
                                                              for s in saved_groups):
        raise ValueError("not an optimizer state dict: 'param_groups' must be a list of dicts")
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state dict has {len(saved_groups)} parameter groups, the optimizer "
                         f"has {len(groups)}")
    for i, (g, s) in enumerate(zip(groups, saved_groups)):
        if len(s.get("params", ())) != len(g["params"]):
            raise ValueError(f"parameter group {i}: the state dict has {len(s.get('params', ()))} "
                             f"parameters, the optimizer has {len(g['params'])}")
        if s.get("chain", g.get("chain")) != g.get("chain"):
            raise ValueError(f"parameter group {i}: the state dict's group runs the chain "
                             f"{s.get('chain')!r}, this optimizer's runs {g.get('chain')!r}")
        if not isinstance(s.get(engine.GROUP_STATE, {}), dict):
            raise ValueError(f"parameter group {i}: its {engine.GROUP_STATE!r} must be a dict")
    from .precision import MASTER, uses_master

    id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups),
                      chain.from_iterable(g["params"] for g in groups)))
    chain_of = {id(p): opt._chain_of(g) if hasattr(opt, "_chain_of") else None
                for g in groups for p in g["params"]}
    state = defaultdict(dict)
    for key, values in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"the state dict has state for parameter id {key!r}, which is in no "
                             f"parameter group")
        p = id_map[key]
        if not isinstance(values, dict):
            raise ValueError(f"state of parameter {key!r} must be a dict, got {type(values).__name__}")
        # Encoded entries (8-/4-bit codes and their scales) are checked as what they decode to.
        values, encoded = state_codecs.split_encoded(values, p)
        rules = chain_of[id(p)]
        if rules is not None and all(spec is not None for spec, _ in rules.specs):
            # Every entry is one the chain's blocks keep (or a flag, a master copy, a wrapper's):
            # another optimizer's state (Adam's loaded into SGD) is refused.
            known = {*rules.kept, *rules.transient, MASTER, *Optimizer._keep_on_clear,
                     *getattr(opt, "extra_state", ())}
            foreign = sorted(str(k) for k in values if k not in known)
            if foreign:
                raise ValueError(f"state of parameter {key!r} has {', '.join(foreign)}, which "
                                 f"this optimizer's chain ({rules!r}) does not keep: a state "
                                 f"dict of another optimizer?")
        if rules is not None:
            for name, rule in rules.kept.items():
                value = values.get(name)
                if rule.kind == "number" and name in values and not (
                        (isinstance(value, numbers.Real) and not isinstance(value, bool)) or
                        (isinstance(value, torch.Tensor) and value.numel() == 1)):
                    raise ValueError(f"state {name!r} of parameter {key!r} must be a number, got "
                                     f"{type(value).__name__} {value!r}")
            required = rules.required_state(p)
            present = required & set(values)
            if present and present != required:
                raise ValueError(f"state of parameter {key!r} is truncated: it has "
                                 f"{', '.join(sorted(present))} but not "
                                 f"{', '.join(sorted(required - present))}")
        own = {}
        for name, value in values.items():
            rule = rules.kept.get(name) if rules is not None else None
            if isinstance(value, torch.Tensor):
                expected = rule.shape_for(p) if rule is not None and rule.kind == "tensor" else \
                    (tuple(p.shape) if value.dim() > 0 else ())
                if expected is not None and tuple(value.shape) != expected:
                    what = f" ({rule.what})" if rule is not None else ""
                    raise ValueError(f"state {name!r} of parameter {key!r} has shape "
                                     f"{tuple(value.shape)}, expected {expected}{what} for a "
                                     f"parameter of shape {tuple(p.shape)}")
                value = value.detach()
                if value.is_floating_point() and p.is_floating_point():
                    value = value.to(device=p.device, dtype=_state_dtype(opt, p), copy=True)
                else:
                    value = value.to(device=p.device, copy=True)
            else:
                value = copy.deepcopy(value)
            own[name] = value
        if rules is not None and hasattr(opt, "_codec"):  # stored as this optimizer stores it
            own = opt._codec().load(own, p, rules.kept, None if uses_master(p.dtype, getattr(
                opt, "master_weights", True)) else p.dtype, encoded)
        state[p] = own
    new_groups = []
    for i, (g, s) in enumerate(zip(groups, saved_groups)):
        values = hp.canonical_names({k: v for k, v in s.items() if k != "params"},
                                    f"parameter group {i}: ")
        missing = sorted(k for k in dict.keys(g) if k not in engine.HIDDEN_GROUP_KEYS
                         and k not in values)
        if missing:
            raise ValueError(f"parameter group {i}: the state dict's group has no "
                             f"{', '.join(map(repr, missing))}, which this optimizer's has: a "
                             f"state dict of another optimizer?")
        hp.validate_group(values, i)
        new = hp.ParamGroup(copy.deepcopy(values))
        new["params"] = g["params"]
        if "param_names" in g and "param_names" not in new:
            new["param_names"] = g["param_names"]
        new_groups.append(new)
    return state, new_groups
