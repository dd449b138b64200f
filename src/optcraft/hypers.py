"""Hyperparameters: their one home.

Everything about a hyperparameter's *value* lives here: torch's names for fastai's (`betas`,
`momentum`, `weight_decay`), spreading one value over parameter groups (a scalar, a list with one
value per group, fastai's `slice`), validation with errors that name the hyperparameter, the group
and the accepted range, and the `ParamGroup` dict that lets torch code read and write torch's names.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Iterable, Mapping, MutableMapping

import torch

# ---- torch's names -------------------------------------------------------------------------------

#: torch.optim's name -> the fastai names it stands for (a tuple means a tuple value).
TORCH_ALIASES: dict[str, tuple[str, ...]] = {
    "betas": ("mom", "sqr_mom"),
    "momentum": ("mom",),
    "weight_decay": ("wd",),
}


def canonical_names(values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Translate torch's names into fastai's; both spellings of one hyperparameter is an error.

    >>> canonical_names({'lr': 1e-3, 'betas': (0.9, 0.99)})
    {'lr': 0.001, 'mom': 0.9, 'sqr_mom': 0.99}
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in TORCH_ALIASES:
            out[key] = value
    for key, value in values.items():
        names = TORCH_ALIASES.get(key)
        if names is None:
            continue
        clash = [n for n in names if n in values]
        if clash:
            raise ValueError(f"{where}both {key!r} (torch's name) and {clash[0]!r} were given; "
                             f"they are the same hyperparameter: give one")
        if len(names) == 1:
            out[names[0]] = value
        else:
            if not isinstance(value, (tuple, list)) or len(value) != len(names):
                raise ValueError(f"{where}{key!r} must be a tuple of {len(names)} values "
                                 f"({', '.join(names)}), got {value!r}")
            out.update(zip(names, value))
    return out


class ParamGroup(dict):
    """A torch param group (a plain dict of 'params' and hyperparameters, fastai's names) that also
    answers to torch's names, so torch's schedulers can read and write `group['betas']` or
    `group['momentum']` and `'betas' in optimizer.defaults` holds.

    Only the canonical names are stored: `state_dict()` and `items()` see fastai's names once.
    """

    def _alias(self, key):
        names = TORCH_ALIASES.get(key) if isinstance(key, str) else None
        if names is not None and not dict.__contains__(self, key) and \
                all(dict.__contains__(self, n) for n in names):
            return names
        return None

    def __getitem__(self, key):
        names = self._alias(key)
        if names is None:
            return dict.__getitem__(self, key)
        values = tuple(dict.__getitem__(self, n) for n in names)
        return values if len(names) > 1 else values[0]

    def __setitem__(self, key, value):
        names = self._alias(key)
        if names is None:
            return dict.__setitem__(self, key, value)
        if len(names) == 1:
            return dict.__setitem__(self, names[0], value)
        value = tuple(value)
        if len(value) != len(names):
            raise ValueError(f"{key!r} must be a tuple of {len(names)} values, got {value!r}")
        for n, v in zip(names, value):
            dict.__setitem__(self, n, v)

    def __contains__(self, key):
        return dict.__contains__(self, key) or self._alias(key) is not None

    def get(self, key, default=None):
        return self[key] if key in self else default

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def __reduce__(self):
        return (ParamGroup, (dict(self),))

    def copy(self):
        return ParamGroup(self)


class HyperView(MutableMapping):
    """fastai's `hypers[i]`: a live view of param group i without its 'params' (nor its names,
    its chain, its own state)."""

    _hidden = ("params", "param_names", "chain", "group_state")

    def __init__(self, group: dict):
        self._group = group

    def __getitem__(self, key):
        if key in self._hidden:
            raise KeyError(key)
        return self._group[key]

    def __setitem__(self, key, value):
        if key in self._hidden:
            raise KeyError(f"{key!r} is not a hyperparameter")
        self._group[key] = value

    def __delitem__(self, key):
        if key in self._hidden:
            raise KeyError(key)
        del self._group[key]

    def __iter__(self):
        return (k for k in dict.keys(self._group) if k not in self._hidden)

    def __len__(self):
        return sum(1 for _ in self)

    def __repr__(self):
        return repr(dict(self))


# ---- spreading a value over groups ------------------------------------------------------------

def even_mults(start: float, stop: float, n: int) -> list[float]:
    """`n` values from `start` to `stop`, evenly spaced on a log scale (fastai's `even_mults`)."""
    if n == 1:
        return [stop]
    step = (stop / start) ** (1 / (n - 1))
    return [start * step ** i for i in range(n)]


def spread(name: str, value: Any, n_groups: int) -> list:
    """One value per group from a scalar, a list/tuple with one value per group, or a slice.

    `slice(a, b)` is log-uniform from a to b over the groups; `slice(b)` gives b/10 to every
    group but the last and b to the last.
    """
    if isinstance(value, slice):
        if value.step is not None or value.stop is None:
            raise ValueError(f"{name}: a slice must be slice(stop) or slice(start, stop), got {value}")
        if value.start:
            return even_mults(value.start, value.stop, n_groups)
        return [value.stop / 10] * (n_groups - 1) + [value.stop]
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return list(value) * n_groups
        if len(value) != n_groups:
            raise ValueError(f"{name}: got {len(value)} values for {n_groups} parameter group(s); "
                             f"give one value, or one per group")
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element (one value, as torch takes it), got "
                         f"shape {tuple(value.shape)}; for one value per group give a list")
    if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):
        # fastai's schedulers give one value per group as a numpy array (discriminative lrs).
        listed = value.tolist() if hasattr(value, "tolist") else None
        if listed is None or isinstance(listed, list) and any(isinstance(v, list) for v in listed):
            raise TypeError(f"{name}: got an array ({type(value).__name__}) that is not one value "
                            f"or one row of values; give a number, a list or tuple with one value "
                            f"per group, or a slice")
        return spread(name, listed, n_groups)
    return [value] * n_groups


# ---- validation ------------------------------------------------------------------------------

#: name -> (low, high, low inclusive, high inclusive, what it is)
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, math.inf, True, False),
    "mom": (0.0, 1.0, True, False),
    "sqr_mom": (0.0, 1.0, True, False),
    "eps": (0.0, math.inf, True, False),
    "eps_root": (0.0, math.inf, True, False),
    "wd": (0.0, math.inf, True, False),
    "beta": (0.0, math.inf, True, False),
    "nu_1": (0.0, 1.0, True, True),
    "nu_2": (0.0, 1.0, True, True),
    "trust_coeff": (0.0, math.inf, True, False),
}


def _range_text(lo, hi, lo_in, hi_in) -> str:
    return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def validate(name: str, value: Any, group: int | None = None, read: bool = True) -> None:
    """Raise ValueError/TypeError naming `name` (and the group) if `value` is not acceptable.
    With `read=False` (before each step) a tensor's value is not read, only its kind: reading it
    would make the host wait for the device."""
    rule = RANGES.get(name)
    if rule is None:
        return
    where = f"{name}" if group is None else f"{name} (parameter group {group})"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element ({where}: got shape "
                             f"{tuple(value.shape)})")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{where}: a tensor value must be real, got dtype {value.dtype}")
        if value.device.type == "meta" or not read:
            return
        number = float(value.detach().cpu())
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a real number, got {type(value).__name__} {value!r}")
    else:
        number = float(value)
    lo, hi, lo_in, hi_in = rule
    ok = (number >= lo if lo_in else number > lo) and (number <= hi if hi_in else number < hi)
    if not ok or math.isnan(number):
        raise ValueError(f"{where} must be in {_range_text(*rule)}, got {value!r}")


def check_known(name: str, known: set) -> None:
    """ValueError for a hyperparameter the optimizer does not have, naming close matches."""
    if name in known:
        return
    import difflib
    # The same words in another order (`mom_sqr` for `sqr_mom`) first, then difflib's.
    words = sorted(name.split("_"))
    close = [k for k in sorted(known) if sorted(k.split("_")) == words]
    close += [k for k in difflib.get_close_matches(name, sorted(known), n=3) if k not in close]
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown hyperparameter {name!r}{hint} (this optimizer has "
                     f"{', '.join(sorted(known)) or 'none'})")


def current_value(value, step: int):
    """The value a hyperparameter has at `step`: a schedule's value, or the value itself."""
    from .schedules import is_schedule
    return value(step) if is_schedule(value) else value


def validate_group(values: Mapping[str, Any], group: int | None = None,
                   read: bool = True) -> None:
    for name, value in values.items():
        if name not in HyperView._hidden:
            validate(name, value, group, read)


#: Keyword arguments of a recipe that choose how it runs, not what it computes.
EXECUTION_KEYWORDS = ("impl", "master_weights")
#: How the state is stored (`optcraft.state_codecs`): every named recipe takes them.
STORAGE_KEYWORDS = ("state_bits", "rounding")


def torch_names(recipe):
    """Make `recipe` a named optimizer: it takes torch's names (`betas`, `momentum`,
    `weight_decay`) as well as fastai's (giving both spellings of one hyperparameter raises
    ValueError), and the arguments it turns into its chain rather than into hyperparameters
    (`decouple_wd`, Larc's `clip`, a predicate) are fixed: given in a group dict, by `set_hyper`
    or in `add_param_group` they are refused with an error that says so, instead of being stored
    and silently ignored.  The optimizer records them as `fixed_args`.  Every named optimizer
    also takes `state_bits` and `rounding` (see `optcraft.state_codecs`), set on the optimizer it
    builds where the recipe does not take them itself, and `capturable` (see
    `Optimizer.set_capturable`)."""
    import functools

    signature = inspect.signature(recipe)
    first = next(iter(signature.parameters))
    storage = [k for k in STORAGE_KEYWORDS if k not in signature.parameters]
    takes_capturable = "capturable" in signature.parameters

    @functools.wraps(recipe)
    def call(*args, **kwargs):
        capturable = None if takes_capturable else kwargs.pop("capturable", None)
        stored_as = {k: kwargs.pop(k) for k in storage if k in kwargs}
        stored_as = {k: v for k, v in stored_as.items() if v is not None}  # None: the default
        if stored_as:
            from .state_codecs import check
            check(stored_as.get("state_bits", 32), stored_as.get("rounding"))
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in TORCH_ALIASES}
        if given:
            translated = canonical_names(given, f"{recipe.__name__}: ")
            explicit = signature.bind_partial(*args, **kwargs).arguments
            for name in translated:
                if name in explicit or name in kwargs:
                    torch_name = next(k for k in given if name in TORCH_ALIASES[k])
                    raise ValueError(f"{recipe.__name__}: both {torch_name!r} (torch's name) and "
                                     f"{name!r} were given; they are the same hyperparameter")
            kwargs.update(translated)
        bound = signature.bind_partial(*args, **kwargs)
        params = bound.arguments.get(first)
        groups = []
        if params is not None and not isinstance(params, (torch.Tensor, dict)):
            params = bound.arguments[first] = list(params)  # read twice: a generator would not be
            groups = [g for g in params if isinstance(g, dict)]
        opt = recipe(*bound.args, **bound.kwargs)
        inner = _inner(opt)
        if hasattr(inner, "chains"):
            # the recipe's arguments that did not become hyperparameters chose the chain
            inner.fixed_args = {k: v for k, v in _arguments(signature, bound).items()
                                if k not in inner._hyper_names}
            inner.recipe_name = recipe.__name__
            for i, group in enumerate(groups):
                for k, v in canonical_names(group, f"parameter group {i}: ").items():
                    if k in inner.fixed_args and not same_value(v, inner.fixed_args[k]):
                        raise ValueError(fixed_message(recipe.__name__, k, f"parameter group {i}"))
        if stored_as:
            from .state_codecs import configure
            configure(opt, **stored_as)
        if capturable is not None:
            inner.set_capturable(capturable)
        return opt

    return call


def _inner(opt):
    """The optimizer that runs the chain, inside wrappers such as Lookahead."""
    while not hasattr(opt, "chains") and hasattr(opt, "opt"):
        opt = opt.opt
    return opt


def _arguments(signature, bound) -> dict:
    """A recipe's arguments (with their defaults) but its parameters and execution switches."""
    bound = signature.bind_partial(*bound.args, **bound.kwargs)
    bound.apply_defaults()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {name: bound.arguments[name] for name, param in list(signature.parameters.items())[1:]
            if name not in EXECUTION_KEYWORDS and param.kind not in variadic
            and name in bound.arguments}


def same_value(a, b) -> bool:
    """Whether a value given again for a fixed argument is the one the chain was built with
    (ZeroRedundancyOptimizer hands its keyword arguments to the optimizer it builds in each group
    too)."""
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 (a comparison that is not a bool: not the same)
        return False


def fixed_message(recipe: str, name: str, where: str) -> str:
    return (f"{where}: {name!r} chooses {recipe}'s chain of blocks when the optimizer is built; "
            f"it cannot be given per group or changed later (build the optimizer with "
            f"{name}=... instead)")
