"""`optcraft trajectory`: the paths of optimizers on 2-D test functions, over their contour plots.

The point (x, y) is one parameter tensor of two elements, so layer-wise optimizers (LARC, LAMB)
see one "layer".  Each optimizer's learning rate, unless given with --lr, is the one of a log grid
(half-decade steps from 1e-4 to 10) that ends about as low as the best of them, the smallest
such, among the paths that do not leave the plotted region (grown by half its size on each side)
or overflow: on these functions the right step size differs by orders of magnitude between
optimizers, and a fixed one would show only which optimizer it happens to suit.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import registry
from .common import (CLIError, add_run_options, at_least, build_optimizer, optimizer_names,
                     parse_lrs, prepare, progress, pyplot, save_figure)

LR_GRID = tuple(10 ** (e / 2) for e in range(-8, 3))  # 1e-4 ... 10
DEFAULT_OPTIMIZERS = ("SGD", "Adam", "RAdam", "Lamb", "ranger")
FIGURE_DPI = 100


@dataclass(frozen=True)
class Function2D:
    name: str
    formula: str
    value: Callable[[float, float], float]
    gradient: Callable[[float, float], tuple[float, float]]
    box: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max
    start: tuple[float, float]
    minima: tuple[tuple[float, float], ...]
    minimum: float

    def inside(self, x: float, y: float, margin: float = 0.0) -> bool:
        x0, x1, y0, y1 = self.box
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        return x0 - mx <= x <= x1 + mx and y0 - my <= y <= y1 + my


def _rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def _rosenbrock_gradient(x, y):
    return -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)


def _rastrigin(x, y):
    return 20 + x * x - 10 * math.cos(2 * math.pi * x) + y * y - 10 * math.cos(2 * math.pi * y)


def _rastrigin_gradient(x, y):
    return (2 * x + 20 * math.pi * math.sin(2 * math.pi * x),
            2 * y + 20 * math.pi * math.sin(2 * math.pi * y))


def _beale_terms(x, y):
    return 1.5 - x + x * y, 2.25 - x + x * y ** 2, 2.625 - x + x * y ** 3


def _beale(x, y):
    return sum(t * t for t in _beale_terms(x, y))


def _beale_gradient(x, y):
    a, b, c = _beale_terms(x, y)
    return (2 * a * (y - 1) + 2 * b * (y ** 2 - 1) + 2 * c * (y ** 3 - 1),
            2 * a * x + 4 * b * x * y + 6 * c * x * y ** 2)


def _saddle(x, y):
    return x * x - y * y + y ** 4 / 4


def _saddle_gradient(x, y):
    return 2 * x, -2 * y + y ** 3


FUNCTIONS = {f.name: f for f in (
    Function2D("rosenbrock", "(1-x)^2 + 100 (y-x^2)^2", _rosenbrock, _rosenbrock_gradient,
                 (-2.0, 2.0, -1.0, 3.0), (-1.5, 2.0), ((1.0, 1.0),), 0.0),
    Function2D("rastrigin", "20 + x^2 - 10 cos 2πx + y^2 - 10 cos 2πy", _rastrigin,
                 _rastrigin_gradient, (-4.5, 4.5, -4.5, 4.5), (-3.6, 3.3), ((0.0, 0.0),), 0.0),
    Function2D("beale", "(1.5-x+xy)^2 + (2.25-x+xy^2)^2 + (2.625-x+xy^3)^2", _beale,
                 _beale_gradient, (-4.5, 4.5, -4.5, 4.5), (-2.5, -1.0), ((3.0, 0.5),), 0.0),
    # A saddle at the origin between two minima at (0, ±√2): plain gradient descent started on
    # the ridge escapes it only as fast as the tiny y offset grows.
    Function2D("saddle", "x^2 - y^2 + y^4/4", _saddle, _saddle_gradient,
                 (-2.0, 2.0, -2.5, 2.5), (-1.8, 1e-3),
                 ((0.0, math.sqrt(2)), (0.0, -math.sqrt(2))), -1.0),
)}


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "trajectory", help="optimizer paths on 2-D test functions (PNG)",
        description="Run optimizers from the same start on 2-D test functions (Rosenbrock, "
                    "Rastrigin, Beale, a saddle) and draw their paths over the function's contour "
                    "plot. Each optimizer's learning rate, unless given, is the smallest of a log "
                    "grid (1e-4 to 10) whose path ends about as low as the best one while staying "
                    "in view.")
    parser.add_argument("--function", default="all", metavar="NAMES",
                        help=f"comma-separated, from {', '.join(FUNCTIONS)}; or all (default)")
    parser.add_argument("--optimizers", metavar="NAMES",
                        help=f"comma-separated optimizer names (default: "
                             f"{','.join(DEFAULT_OPTIMIZERS)})")
    parser.add_argument("--steps", type=int, default=200, help="default: 200")
    parser.add_argument("--lr", metavar="NAME=LR,...",
                        help="learning rates, e.g. Adam=0.1,SGD=1e-3, or one number for all "
                             "(default: the best of the grid, per function)")
    add_run_options(parser, training=False)
    parser.set_defaults(run=run)
    return parser


def function_names(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return list(FUNCTIONS)
    names = []
    for name in (n.strip().lower() for n in text.split(",") if n.strip()):
        if name not in FUNCTIONS:
            import difflib

            close = difflib.get_close_matches(name, list(FUNCTIONS), n=2, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CLIError(f"unknown function {name!r}{hint} (choose from "
                           f"{', '.join(FUNCTIONS)}, or all)")
        if name not in names:
            names.append(name)
    if not names:
        raise CLIError("--function needs at least one function name")
    return names


def path(function: Function2D, entry: registry.Entry, lr: float, steps: int, impl,
         stop_outside: float | None = None) -> list[tuple[float, float]]:
    """The points visited, the start first; with `stop_outside`, the path is cut as soon as it
    leaves the region grown by that fraction (or stops being finite)."""
    point = torch.nn.Parameter(torch.tensor(function.start, dtype=torch.float64))
    opt = build_optimizer(entry, [point], lr, impl)
    points = [function.start]
    for _ in range(steps):
        x, y = points[-1]
        try:
            gradient = function.gradient(x, y)
        except OverflowError:
            break  # diverged: the path ends where its gradient no longer fits a float
        point.grad = torch.tensor(gradient, dtype=torch.float64)
        opt.step()
        x, y = point.tolist()
        points.append((x, y))
        if stop_outside is not None and not (math.isfinite(x) and math.isfinite(y)
                                             and function.inside(x, y, stop_outside)):
            break
    return points


def _final_value(function: Function2D, points, steps: int) -> float:
    if len(points) < steps + 1:
        return math.inf
    try:
        value = function.value(*points[-1])
    except OverflowError:
        return math.inf
    return value if math.isfinite(value) else math.inf


def best_lr(function: Function2D, entry: registry.Entry, steps: int, impl) -> float:
    """The smallest learning rate of the grid whose path stays in view and ends about as low as
    the lowest one: with at least 99% of the best descent from the start.  The smallest such rate, because larger ones often reach the same value by a wild path
    that shows nothing of how the optimizer moves."""
    gaps = []
    for lr in LR_GRID:
        points = path(function, entry, lr, steps, impl, stop_outside=0.5)
        gaps.append(_final_value(function, points, steps) - function.minimum)
    best = min(gaps)
    if not math.isfinite(best):
        return LR_GRID[0]
    tolerance = best + 0.01 * (function.value(*function.start) - function.minimum - best)
    return next(lr for lr, gap in zip(LR_GRID, gaps) if gap <= tolerance)


def layout(n: int) -> tuple[int, int, tuple[float, float]]:
    if n == 1:
        return 1, 1, (7.0, 6.0)
    if n == 2:
        return 1, 2, (12.0, 5.5)
    rows = math.ceil(n / 2)
    return rows, 2, (12.0, 5.0 * rows)


def plot(file, functions: list[Function2D], runs: dict, steps: int) -> None:
    import numpy as np

    plt = pyplot()
    rows, cols, size = layout(len(functions))
    fig, axes = plt.subplots(rows, cols, figsize=size, dpi=FIGURE_DPI, squeeze=False)
    for ax in axes.flat[len(functions):]:
        ax.set_visible(False)
    for ax, function in zip(axes.flat, functions):
        x0, x1, y0, y1 = function.box
        xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
        zs = np.vectorize(function.value)(xs, ys)
        # log(1 + f - min) shows the valleys of functions that span orders of magnitude.
        ax.contourf(xs, ys, np.log1p(zs - function.minimum), levels=30, cmap="Greys_r", alpha=0.85)
        ax.contour(xs, ys, np.log1p(zs - function.minimum), levels=15, colors="k",
                   linewidths=0.3, alpha=0.5)
        for mx, my in function.minima:
            ax.plot(mx, my, marker="*", ms=14, color="gold", markeredgecolor="k", ls="none")
        ax.plot(*function.start, marker="o", ms=7, color="white", markeredgecolor="k")
        for i, (name, (lr, points)) in enumerate(runs[function.name].items()):
            px, py = zip(*points)
            color = f"C{i % 10}"
            ax.plot(px, py, color=color, lw=1.4, label=f"{name} (lr {lr:.2g})")
            ax.plot(px[-1], py[-1], marker="X", ms=8, color=color, markeredgecolor="k")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(f"{function.name}: {function.formula}", fontsize="medium")
        ax.legend(loc="best", fontsize="small", framealpha=0.85)
    save_figure(fig, file, f"optcraft trajectory: {steps} steps from ○, minima ★, ends ✕",
                FIGURE_DPI)


def run(args) -> int:
    functions = [FUNCTIONS[n] for n in function_names(args.function)]
    names = optimizer_names(args.optimizers, [n for n in DEFAULT_OPTIMIZERS])
    given = parse_lrs(args.lr, names)
    at_least(args.steps, 1, "--steps")
    entries = [registry.get(n) for n in names]
    for entry in entries:
        build_optimizer(entry, [torch.nn.Parameter(torch.zeros(2))], given.get(entry.name),
                        args.impl)
    folder = prepare(args.out)
    runs: dict = {}
    with progress(total=len(functions) * len(entries), desc="trajectory", unit="path") as bar:
        for function in functions:
            runs[function.name] = {}
            for entry in entries:
                bar.set_postfix_str(f"{function.name} {entry.name}")
                lr = given.get(entry.name)
                if lr is None:
                    lr = best_lr(function, entry, args.steps, args.impl)
                runs[function.name][entry.name] = (lr, path(function, entry, lr, args.steps,
                                                            args.impl))
                bar.update(1)

    stem = "trajectory-" + ("all" if len(functions) == len(FUNCTIONS) else
                            "-".join(f.name for f in functions))
    png_path, csv_path = folder / f"{stem}.png", folder / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["function", "optimizer", "lr", "step", "x", "y", "value"])
        for function in functions:
            for name, (lr, points) in runs[function.name].items():
                for step, (x, y) in enumerate(points):
                    try:
                        value = f"{function.value(x, y):.6g}"
                    except OverflowError:
                        value = "inf"
                    writer.writerow([function.name, name, f"{lr:.3g}", step, f"{x:.6g}",
                                     f"{y:.6g}", value])
    plot(png_path, functions, runs, args.steps)

    header = ("function", "optimizer", "lr", "final value", "distance to a minimum")
    lines = []
    for function in functions:
        for name, (lr, points) in runs[function.name].items():
            x, y = points[-1]
            distance = min(math.hypot(x - mx, y - my) for mx, my in function.minima)
            try:
                value = f"{function.value(x, y):.4g}"
            except OverflowError:
                value = "inf"
            lines.append((function.name, name, f"{lr:.3g}", value, f"{distance:.3g}"))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    print("  ".join(f"{h:<{w}}" for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(f"{c:<{w}}" for c, w in zip(line, widths)).rstrip())
    print(f"wrote {png_path} and {csv_path}")
    return 0
