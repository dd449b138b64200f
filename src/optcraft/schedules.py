"""Schedules: a hyperparameter as a function of the step count.

Any hyperparameter of any optcraft optimizer accepts a schedule, as a constructor keyword, in a
group dict, or through `set_hyper`:

    opt = oc.Adam(model.parameters(), lr=oc.schedules.one_cycle(1000, lr_max=1e-2),
                  mom=oc.schedules.one_cycle_mom(1000))

A schedule is any callable `step -> value` (a plain function or lambda works); the objects below
are picklable, print well and combine (`join`, `scale`, `+`/`*` with numbers).  `step` counts the
optimizer steps already taken: 0 for the first `step()`.  Before each step the optimizer writes the
schedule's value into `param_groups` (so users, loggers and torch's schedulers read the value in
use); the count is saved in `state_dict()` (schedules themselves are code and are not: rebuild the
optimizer with the same schedules, then load the checkpoint).

A schedule owns its hyperparameter: a value written into that hyperparameter by anything else (a
torch lr_scheduler, user code) is replaced before the next step, with a warning the first time.
To combine with a torch scheduler, give each its own hyperparameters (say torch's OneCycleLR on
lr, a schedule on wd), or `set_hyper(name, value)` to remove a schedule.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence


class Schedule:
    """Base class: a picklable function of the step count."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def __add__(self, other):
        return _Combined(self, other, "add")

    __radd__ = __add__

    def __mul__(self, other):
        return _Combined(self, other, "mul")

    __rmul__ = __mul__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _value(x, step):
    return x(step) if callable(x) else x


class _Combined(Schedule):
    def __init__(self, a, b, op):
        self.a, self.b, self.op = a, b, op

    def __call__(self, step):
        a, b = _value(self.a, step), _value(self.b, step)
        return a + b if self.op == "add" else a * b


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _progress(step, steps):
    return min(max(step, 0), steps) / steps


class constant(Schedule):
    """`value` at every step."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, step):
        return self.value


class linear(Schedule):
    """From `start` to `end` linearly over `steps` steps, then `end`."""

    def __init__(self, start: float, end: float, steps: int):
        _check_steps(steps)
        self.start, self.end, self.steps = start, end, steps

    def __call__(self, step):
        return self.start + (self.end - self.start) * _progress(step, self.steps)


class cosine(Schedule):
    """From `start` to `end` along half a cosine over `steps` steps, then `end`."""

    def __init__(self, start: float, end: float, steps: int):
        _check_steps(steps)
        self.start, self.end, self.steps = start, end, steps

    def __call__(self, step):
        t = _progress(step, self.steps)
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * t)) / 2


class exponential(Schedule):
    """`start * rate ** (step / steps)`: multiplied by `rate` every `steps` steps (continuously),
    never below `end` (if given)."""

    def __init__(self, start: float, rate: float, steps: int = 1, end: float | None = None):
        _check_steps(steps)
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        self.start, self.rate, self.steps, self.end = start, rate, steps, end

    def __call__(self, step):
        value = self.start * self.rate ** (max(step, 0) / self.steps)
        if self.end is not None:
            value = max(value, self.end) if self.rate < 1 else min(value, self.end)
        return value


class polynomial(Schedule):
    """`end + (start - end) * (1 - step/steps) ** power` over `steps` steps, then `end`."""

    def __init__(self, start: float, end: float, steps: int, power: float = 1.0):
        _check_steps(steps)
        self.start, self.end, self.steps, self.power = start, end, steps, power

    def __call__(self, step):
        return self.end + (self.start - self.end) * (1 - _progress(step, self.steps)) ** self.power


class piecewise(Schedule):
    """Piecewise constant: `values[i]` for `boundaries[i-1] <= step < boundaries[i]`.

    >>> piecewise([0.1, 0.01, 0.001], boundaries=[100, 200])(150)
    0.01
    """

    def __init__(self, values: Sequence[float], boundaries: Sequence[int]):
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"piecewise needs one more value than boundaries, got "
                             f"{len(values)} values and {len(boundaries)} boundaries")
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"boundaries must be increasing, got {list(boundaries)}")
        self.values, self.boundaries = list(values), list(boundaries)

    def __call__(self, step):
        return self.values[bisect.bisect_right(self.boundaries, step)]


class join(Schedule):
    """Schedules one after another: `schedules[i]` runs from `boundaries[i-1]`, seeing the steps
    counted from its own start (optax's `join_schedules`)."""

    def __init__(self, schedules: Sequence[Callable], boundaries: Sequence[int]):
        if len(schedules) != len(boundaries) + 1:
            raise ValueError(f"join needs one more schedule than boundaries, got "
                             f"{len(schedules)} schedules and {len(boundaries)} boundaries")
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"boundaries must be increasing, got {list(boundaries)}")
        self.schedules, self.boundaries = list(schedules), list(boundaries)

    def __call__(self, step):
        i = bisect.bisect_right(self.boundaries, step)
        start = self.boundaries[i - 1] if i else 0
        return _value(self.schedules[i], step - start)


class scale(Schedule):
    """`factor * schedule(step)`."""

    def __init__(self, schedule: Callable, factor: float):
        self.schedule, self.factor = schedule, factor

    def __call__(self, step):
        return self.factor * _value(self.schedule, step)


def warmup_then(decay: Callable, warmup_steps: int, start: float = 0.0) -> join:
    """Linear warm-up from `start` to `decay(0)` over `warmup_steps`, then `decay`."""
    _check_steps(warmup_steps)
    return join([linear(start, _value(decay, 0), warmup_steps), decay], [warmup_steps])


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end: float = 0.0,
                  start: float = 0.0) -> join:
    """Linear warm-up to `peak`, then cosine decay to `end` at `total_steps`."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    return warmup_then(cosine(peak, end, total_steps - warmup_steps), warmup_steps, start)


def one_cycle(total_steps: int, lr_max: float, pct_start: float = 0.25, div: float = 25.0,
              div_final: float = 1e5) -> join:
    """fastai's one-cycle learning rate: cosine from `lr_max/div` up to `lr_max` over the first
    `pct_start` of the steps, then cosine down to `lr_max/div_final` (Smith, 2018,
    arXiv:1803.09820; fastai's `fit_one_cycle`)."""
    _check_steps(total_steps)
    if not 0 < pct_start < 1:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start!r}")
    up = max(1, round(total_steps * pct_start))
    down = max(1, total_steps - up)
    return join([cosine(lr_max / div, lr_max, up), cosine(lr_max, lr_max / div_final, down)], [up])


def one_cycle_mom(total_steps: int, moms: tuple = (0.95, 0.85, 0.95),
                  pct_start: float = 0.25) -> join:
    """fastai's one-cycle momentum, the mirror of the learning rate's: cosine from `moms[0]` down
    to `moms[1]`, then back up to `moms[2]`."""
    _check_steps(total_steps)
    up = max(1, round(total_steps * pct_start))
    down = max(1, total_steps - up)
    return join([cosine(moms[0], moms[1], up), cosine(moms[1], moms[2], down)], [up])


def is_schedule(value) -> bool:
    """A hyperparameter value that is a schedule: any callable that is not a tensor."""
    import torch
    return callable(value) and not isinstance(value, (torch.Tensor, type))
