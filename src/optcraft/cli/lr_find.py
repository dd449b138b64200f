"""`optcraft lr-find NAME`: the learning-rate range test of fastai's `lr_find`.

The learning rate grows exponentially from `start_lr` to `end_lr` over `num_it` steps of training
the digits network from scratch; the loss is smoothed with a debiased exponential moving average
(beta 0.98), and the test stops early once the smoothed loss exceeds four times its minimum
(divergence).  Two learning rates are suggested, with fastai's definitions, from the smoothed
losses less the first tenth and the last five steps:

* steep: where the loss falls fastest against log(lr) (the most negative finite difference);
* valley: about halfway into the longest valley, the longest run of decreasing losses (the
  longest strictly decreasing subsequence); fastai's default.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data import load_digits
from .common import (CLIError, add_run_options, at_least, batches, build_optimizer,
                     digits_model, lookup, positive_float, prepare, progress, pyplot, save_figure)

FIGURE_SIZE = (8.0, 5.0)  # inches, at FIGURE_DPI: an 800 x 500 pixel PNG
FIGURE_DPI = 100
SMOOTHING = 0.98
DIVERGENCE = 4.0


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "lr-find", help="the learning-rate range test (fastai's lr_find)",
        description="Train the digits network from scratch while the learning rate grows "
                    "exponentially from --start-lr to --end-lr; plot the smoothed loss against "
                    "the learning rate and suggest learning rates (valley and steep, fastai's "
                    "definitions). Writes lr-find-NAME.png and lr-find-NAME.csv.")
    parser.add_argument("name", metavar="NAME", help="an optimizer name (see `optcraft list`)")
    parser.add_argument("--start-lr", default="1e-7", help="default: 1e-7")
    parser.add_argument("--end-lr", default="10", help="default: 10")
    parser.add_argument("--num-it", type=int, default=100, help="steps of the sweep (default: 100)")
    parser.add_argument("--no-stop-div", dest="stop_div", action="store_false",
                        help="sweep to --end-lr even after the loss diverges")
    add_run_options(parser)
    parser.set_defaults(run=run)
    return parser


@dataclass
class Sweep:
    lrs: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    smoothed: list = field(default_factory=list)
    stopped_early: bool = False


def schedule(start_lr: float, end_lr: float, num_it: int, i: int) -> float:
    """The learning rate of step `i` (0-based): start_lr at 0, geometric towards end_lr."""
    return start_lr * (end_lr / start_lr) ** (i / num_it)


def range_test(model, opt, x, y, start_lr, end_lr, num_it, stop_div, batch_size, seed,
               bar=None) -> Sweep:
    generator = torch.Generator().manual_seed(seed)
    sweep, average, best = Sweep(), 0.0, math.inf
    pending: list = []
    for i in range(num_it):
        if not pending:
            pending = batches(len(x), batch_size, generator)
        index = pending.pop(0)
        lr = schedule(start_lr, end_lr, num_it, i)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smoothed = average / (1 - SMOOTHING ** (i + 1))
        sweep.lrs.append(lr)
        sweep.losses.append(value)
        sweep.smoothed.append(smoothed)
        if bar is not None:
            bar.update(1)
        best = min(best, smoothed)
        if stop_div and not smoothed <= DIVERGENCE * best:  # also stops on NaN
            sweep.stopped_early = i + 1 < num_it
            break
    return sweep


def _trimmed(sweep: Sweep, num_it: int) -> tuple[list, list]:
    """fastai's window for the suggestions: without the first tenth of the sweep and its last
    five steps."""
    start = num_it // 10
    end = len(sweep.smoothed) - 5
    return sweep.lrs[start:end], sweep.smoothed[start:end]


def steep(lrs: list, losses: list) -> tuple[float, float] | None:
    """(lr, loss) where the loss falls fastest per unit of log(lr)."""
    if len(lrs) < 2:
        return None
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(len(lrs) - 1)]
    finite = [(s, i) for i, s in enumerate(slopes) if math.isfinite(s)]
    if not finite:
        return None
    _, i = min(finite)
    return lrs[i], losses[i]


def valley(lrs: list, losses: list) -> tuple[float, float] | None:
    """(lr, loss) about halfway into the longest valley of the loss curve."""
    n = len(losses)
    if n < 2:
        return None
    # run[i]: length of the longest strictly decreasing subsequence of losses ending at i.
    run = [1] * n
    end = 0
    for i in range(1, n):
        run[i] = 1 + max((run[j] for j in range(i) if losses[i] < losses[j]), default=0)
        if run[i] > run[end]:
            end = i
    # fastai's arithmetic: the valley "starts" one before its first point, and the suggestion
    # sits a third plus a sixth of the way in (not below the first point of the sweep).
    start = end - run[end]
    third = (end - start) / 3
    i = max(0, start + int(third) + int(third / 2))
    return lrs[i], losses[i]


def plot(path, name: str, sweep: Sweep, suggestions: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    # As fastai's plot: without the last five steps, where a diverging loss would set the scale.
    shown = slice(0, max(2, len(sweep.lrs) - 5))
    lrs, smoothed = sweep.lrs[shown], sweep.smoothed[shown]
    ax.plot(lrs, sweep.losses[shown], color="0.8", lw=0.8, label="loss")
    ax.plot(lrs, smoothed, color="C0", lw=1.6, label="smoothed loss")
    markers = {"valley": ("C3", "o"), "steep": ("C2", "s")}
    for key, found in suggestions.items():
        if found is not None:
            color, marker = markers[key]
            ax.plot(*found, marker=marker, ms=8, color=color, ls="none",
                    label=f"{key}: {found[0]:.2e}")
    ax.set_xscale("log")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:
        # The smoothed curve sets the top; spikes of the raw loss may run off it.
        low = min(finite + [v for v in sweep.losses[shown] if math.isfinite(v)])
        high = max(finite)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path, f"optcraft lr-find {name}: digits conv net", FIGURE_DPI)


def run(args) -> int:
    entry = lookup(args.name)
    start_lr = positive_float(args.start_lr, "--start-lr")
    end_lr = positive_float(args.end_lr, "--end-lr")
    if not end_lr > start_lr:
        raise CLIError(f"--end-lr ({args.end_lr}) must be larger than --start-lr ({args.start_lr})")
    at_least(args.num_it, 2, "--num-it")
    at_least(args.batch_size, 1, "--batch-size")
    folder = prepare(args.out)
    data = load_digits()
    model = digits_model(data.n_features, data.n_classes, args.seed)
    opt = build_optimizer(entry, model.parameters(), start_lr, args.impl)
    torch.manual_seed(args.seed)
    with progress(total=args.num_it, desc=f"lr-find {entry.name}", unit="step") as bar:
        sweep = range_test(model, opt, data.x_train, data.y_train, start_lr, end_lr, args.num_it,
                           args.stop_div, args.batch_size, args.seed, bar)
    lrs, losses = _trimmed(sweep, args.num_it)
    suggestions = {"valley": valley(lrs, losses), "steep": steep(lrs, losses)}

    stem = f"lr-find-{entry.name}"
    csv_path, png_path = folder / f"{stem}.csv", folder / f"{stem}.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(sweep.lrs, sweep.losses, sweep.smoothed), 1):
            writer.writerow([i, *(f"{v:.6g}" for v in row)])
    plot(png_path, entry.name, sweep, suggestions)

    steps = len(sweep.lrs)
    ending = (f"stopped at step {steps} (lr {sweep.lrs[-1]:.2e}): smoothed loss above "
              f"{DIVERGENCE:g}x its minimum" if sweep.stopped_early else "no divergence")
    print(f"lr-find {entry.name}: {steps} steps, lr {start_lr:.1e} to {end_lr:.1e}; {ending}")
    best = min(range(steps), key=lambda i: sweep.smoothed[i]
               if math.isfinite(sweep.smoothed[i]) else math.inf)
    print(f"minimum smoothed loss {sweep.smoothed[best]:.4f} at lr {sweep.lrs[best]:.2e}")
    if all(s is None for s in suggestions.values()):
        print("no suggestion: the sweep stopped too early (try a smaller --start-lr or "
              "--end-lr, or more --num-it)")
    else:
        print("suggested lr: " + ", ".join(f"{k} {v[0]:.2e}" for k, v in suggestions.items()
                                           if v is not None))
    print(f"wrote {png_path} and {csv_path}")
    return 0
