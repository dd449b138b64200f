"""What the commands share: one-line errors, optimizer names, `--lr` values, the output folder,
the optional plotting and progress-bar libraries, and the digits network."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .. import registry
from ..data import MissingDependency, require


class CLIError(Exception):
    """A user error: printed as one line `optcraft: error: ...`, exit status 1."""


def optimizer_names(text: str | None, default: list[str]) -> list[str]:
    """Resolve a comma-separated list of optimizer names (case-insensitive) and named sets
    (`registry.SETS`: classic, research, torch, modern, all) to registry names."""
    if text is None:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CLIError("--optimizers needs at least one optimizer name")
    resolved = []
    for name in names:
        members = registry.named_set(name) if name not in registry.names() else None
        for found in members if members is not None else [lookup(name).name]:
            if found in resolved:
                raise CLIError(f"optimizer {found!r} is listed twice")
            resolved.append(found)
    return resolved


def lookup(name: str) -> registry.Entry:
    try:
        return registry.get(name)
    except registry.UnknownOptimizer as error:
        raise CLIError(str(error)) from None


def positive_float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"{what} must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise CLIError(f"{what} must be a positive number, got {text!r}")
    return value


def parse_lrs(text: str | None, names: list[str]) -> dict[str, float]:
    """`--lr`: `Adam=3e-3,SGD=0.1` (per optimizer) or one number for every optimizer.  Values are
    not range-checked here: the optimizer's own validation does that, with its own message."""
    if text is None:
        return {}
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise CLIError("--lr needs NAME=VALUE pairs, e.g. --lr Adam=3e-3,SGD=0.1, or one number")
    if len(items) == 1 and "=" not in items[0]:
        return {name: _number(items[0], "--lr") for name in names}
    lrs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--lr: expected NAME=VALUE, got {item!r} (e.g. --lr Adam=3e-3,SGD=0.1)")
        entry = lookup(name.strip())
        if entry.name not in names:
            raise CLIError(f"--lr names {entry.name}, which is not among the optimizers run "
                           f"({', '.join(names)})")
        lrs[entry.name] = _number(value.strip(), f"--lr {entry.name}")
    return lrs


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CLIError(f"{what}: {text!r} is not a number") from None


def build_optimizer(entry: registry.Entry, params, lr: float | None, impl: str | None,
                    **kwargs):
    """The optimizer, with the library's own ValueError/TypeError (a bad value) as a CLIError;
    `kwargs` (`state_bits`, `master_weights`) go to the recipe."""
    try:
        return entry.make(params, lr=lr, impl=impl, **kwargs)
    except (ValueError, TypeError) as error:
        raise CLIError(f"{entry.name}: {error}") from None


def at_least(value: int, minimum: int, option: str) -> int:
    if value < minimum:
        raise CLIError(f"{option} must be at least {minimum}, got {value}")
    return value


def prepare(out: str) -> Path:
    """Before any work: the output folder is writable, matplotlib imports (a missing one is
    reported now, not after training), torch runs on few threads."""
    folder = output_folder(out)
    pyplot()
    few_threads()
    return folder


def output_folder(path: str) -> Path:
    """Create the folder (and its parents) and check that a file can be written there, before any
    work is done."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".optcraft-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise CLIError(f"cannot write to output folder {str(folder)!r}: {reason}") from None
    return folder


def add_run_options(parser, *, training: bool = True) -> None:
    """The options every training command shares: --batch-size and --seed (with `training`),
    --impl and --out."""
    from .. import engine

    if training:
        parser.add_argument("--batch-size", type=int, default=64, help="default: 64")
        parser.add_argument("--seed", type=int, default=0,
                            help="initial weights and data order (default: 0)")
    parser.add_argument("--impl", choices=engine.IMPLS, default=None,
                        help="execution path of optcraft's optimizers (default: auto)")
    parser.add_argument("--out", default="optcraft-out", metavar="FOLDER",
                        help="output folder (default: ./optcraft-out)")


def save_figure(fig, path, title: str, dpi: int) -> None:
    """Title, lay out, write as PNG at `dpi` and free the figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no window)."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg", force=True)
    return require("matplotlib.pyplot", "plotting")


def progress(**kwargs):
    """A tqdm progress bar on stderr, shown only on a terminal."""
    tqdm = require("tqdm", "progress bars").tqdm
    return tqdm(file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)


def few_threads() -> None:
    """One intra-op thread, unless OMP_NUM_THREADS says otherwise: the networks here are so small
    that threads cost more than they give, and on a busy machine spinning threads make step times
    jump by tens of milliseconds."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def digits_model(n_features: int, n_classes: int, seed: int) -> torch.nn.Module:
    """The network of `compare` and `lr-find`, initialised from `seed`: a small conv net on the
    8x8 images (two 3x3 convolutions, 16 and 32 channels, a 2x2 max-pool, a linear classifier;
    9,930 parameters).  Convolutions, because several research optimizers treat conv weights
    differently (per output channel, or by gradient centralisation)."""
    side = int(round(n_features ** 0.5))
    if side * side != n_features:
        raise ValueError(f"digits_model expects square images, got {n_features} features")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, side, side)),
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(32 * (side // 2) ** 2, n_classes))
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def batches(n: int, batch_size: int, generator: torch.Generator):
    """The indices of one epoch's shuffled mini-batches (the last may be smaller)."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


__all__ = ["CLIError", "MissingDependency", "optimizer_names", "lookup", "parse_lrs",
           "positive_float", "build_optimizer", "output_folder", "pyplot", "progress",
           "digits_model", "batches", "few_threads",
           "add_run_options", "save_figure", "at_least", "prepare"]
