"""`optcraft compare`: train one network on the digits with each optimizer, under the same initial
weights, data order and seed; print a table, write the curves (PNG) and every step (CSV)."""
from __future__ import annotations

import csv
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import registry
from ..data import Digits, load_digits
from .common import (add_run_options, at_least, batches, build_optimizer, digits_model,
                     optimizer_names, parse_lrs, prepare, progress, pyplot, save_figure)

FIGURE_SIZE = (12.0, 4.5)  # inches, at FIGURE_DPI: a 1200 x 450 pixel PNG
FIGURE_DPI = 100
CSV_NAME, PNG_NAME = "compare.csv", "compare.png"
CSV_COLUMNS = ("optimizer", "lr", "epoch", "step", "train_loss", "step_time_ms", "val_loss",
               "val_accuracy")


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "compare", help="train a small network on the digits with several optimizers",
        description="Train the same network (same initial weights, data order and seed) on "
                    "scikit-learn's handwritten digits with each optimizer; print a table of "
                    "final train loss, validation accuracy and median step time, and write "
                    f"{PNG_NAME} (loss and accuracy curves) and {CSV_NAME} (every step) to the "
                    "output folder.")
    parser.add_argument("--optimizers", metavar="NAMES",
                        help="comma-separated optimizer names or sets (" +
                             ", ".join([*registry.SETS, "all"]) + "; default: "
                             f"{','.join(registry.default_compare())})")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set "
                        "(default: 10)")
    parser.add_argument("--lr", metavar="NAME=LR,...",
                        help="learning rates, e.g. Adam=3e-3,SGD=0.1, or one number for all "
                             "(default: each optimizer's tuned value, see `optcraft show NAME`)")
    parser.add_argument("--state-bits", metavar="BITS",
                        help="comma-separated bits to keep each optimizer's state in: 32, 16 "
                             "(bfloat16), 8, 4 (block-wise quantised); a run each (default: as "
                             "the optimizer keeps it; see docs/memory.md)")
    parser.add_argument("--bf16", action="store_true",
                        help="train bfloat16 parameters without a float32 master copy (updates "
                             "added with stochastic rounding)")
    add_run_options(parser)
    parser.set_defaults(run=run)
    return parser


@dataclass
class Result:
    name: str
    lr: float
    rows: list = field(default_factory=list)
    epoch_accuracy: list = field(default_factory=list)
    diverged_at: int | None = None

    @property
    def step_times(self):
        return [row["step_time_ms"] for row in self.rows]

    def final_train_loss(self, steps_per_epoch: int) -> float:
        """The mean training loss over the last epoch's steps."""
        losses = [row["train_loss"] for row in self.rows[-steps_per_epoch:]]
        return sum(losses) / len(losses)

    @property
    def final_accuracy(self) -> float:
        return self.epoch_accuracy[-1] if self.epoch_accuracy else float("nan")


@torch.no_grad()
def evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    logits = model(x).float()
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def run_label(name: str, state_bits: int | None = None, bf16: bool = False) -> str:
    """A run's name in the table: the optimizer's, with its state bits and bfloat16 weights."""
    return name + ("" if state_bits is None else f" {state_bits}-bit") + (" bf16" if bf16 else "")


def train(entry: registry.Entry, lr: float | None, data: Digits, init_state: dict, epochs: int,
          batch_size: int, seed: int, impl: str | None, state_bits: int | None = None,
          bf16: bool = False) -> Result:
    """One optimizer's run; everything random is drawn from `seed` so every optimizer sees the same
    initial weights and the same batches in the same order.  `state_bits`: the optimizer's
    (None: its default); `bf16`: bfloat16 parameters without master weights (stochastic
    rounding), the loss computed in float32."""
    model = digits_model(data.n_features, data.n_classes, seed)
    model.load_state_dict(init_state)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model.to(dtype)
    extra = {} if state_bits is None else {"state_bits": state_bits}
    if bf16:
        extra["master_weights"] = False
    opt = build_optimizer(entry, model.parameters(), lr, impl, **extra)
    lr = opt.param_groups[0]["lr"]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    name = run_label(entry.name, state_bits, bf16)
    result = Result(name, lr)
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    step = 0
    with progress(total=epochs * steps_per_epoch, desc=f"{name:>10}", unit="step",
                  leave=True) as bar:
        for epoch in range(1, epochs + 1):
            for index in batches(n, batch_size, generator):
                loss = F.cross_entropy(model(data.x_train[index].to(dtype)).float(),
                                       data.y_train[index])
                opt.zero_grad()
                loss.backward()
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
                step += 1
                value = loss.item()
                result.rows.append({"optimizer": name, "lr": lr, "epoch": epoch,
                                    "step": step, "train_loss": value,
                                    "step_time_ms": elapsed * 1e3, "val_loss": "",
                                    "val_accuracy": ""})
                bar.update(1)
                if not math.isfinite(value):
                    result.diverged_at = step
                    bar.set_postfix_str(f"diverged at step {step}")
                    return result
            val_loss, val_accuracy = evaluate(model, data.x_val.to(dtype), data.y_val)
            result.rows[-1]["val_loss"] = val_loss
            result.rows[-1]["val_accuracy"] = val_accuracy
            result.epoch_accuracy.append(val_accuracy)
            bar.set_postfix(loss=f"{value:.3f}", val_acc=f"{val_accuracy:.3f}")
    return result


def parse_state_bits(text: str) -> list[int]:
    from ..state_codecs import STATE_BITS
    from .common import CLIError

    found = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if not item.isdigit() or int(item) not in STATE_BITS:
            raise CLIError(f"--state-bits: {item!r} is not one of {', '.join(map(str, STATE_BITS))}")
        found.append(int(item))
    if not found:
        raise CLIError("--state-bits: give at least one of 32, 16, 8, 4")
    return found


def table(results: list[Result], steps_per_epoch: int) -> str:
    header = ("optimizer", "lr", "train loss", "val accuracy", "step time (ms)")
    lines = []
    for r in results:
        if r.diverged_at is not None:
            loss, accuracy = f"diverged at step {r.diverged_at}", "-"
        else:
            loss = f"{r.final_train_loss(steps_per_epoch):.4f}"
            accuracy = f"{r.final_accuracy:.3f}"
        lines.append((r.name, f"{r.lr:g}", loss, accuracy,
                      f"{statistics.median(r.step_times):.3f}"))
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    align = ["<", ">", ">", ">", ">"]

    def fmt(row):
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def write_csv(path, results: list[Result]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            for row in r.rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                                 for k, v in row.items()})


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as the loss curves of fastai)."""
    out, average = [], 0.0
    for i, v in enumerate(values, 1):
        average = beta * average + (1 - beta) * v
        out.append(average / (1 - beta ** i))
    return out


def plot(path, results: list[Result], steps_per_epoch: int, epochs: int) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    for r in results:
        losses = [row["train_loss"] for row in r.rows if math.isfinite(row["train_loss"])]
        line, = ax_loss.plot(range(1, len(losses) + 1), smooth(losses), lw=1.3, label=r.name)
        ax_acc.plot(range(1, len(r.epoch_accuracy) + 1), r.epoch_accuracy, marker="o", ms=3,
                    lw=1.3, color=line.get_color(), label=r.name)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (smoothed)")
    ax_loss.set_title("Training loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy")
    ax_acc.set_title("Validation accuracy")
    ax_acc.set_xlim(0.5, epochs + 0.5)
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize="small", ncol=2)
    save_figure(fig, path, f"optcraft compare: digits conv net, {epochs} epochs x "
                           f"{steps_per_epoch} steps", FIGURE_DPI)


def run(args) -> int:
    names = optimizer_names(args.optimizers, registry.default_compare())
    lrs = parse_lrs(args.lr, names)
    at_least(args.epochs, 1, "--epochs")
    at_least(args.batch_size, 1, "--batch-size")
    folder = prepare(args.out)
    data = load_digits()
    init_state = digits_model(data.n_features, data.n_classes, args.seed).state_dict()
    entries = [registry.get(n) for n in names]
    # Every optimizer is built once first, so a bad value stops the command before any training.
    for entry in entries:
        build_optimizer(entry, [torch.nn.Parameter(torch.zeros(1))], lrs.get(entry.name),
                        args.impl)
    bits = [None] if args.state_bits is None else parse_state_bits(args.state_bits)
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    results = []
    for entry in entries:
        for state_bits in bits:
            results.append(train(entry, lrs.get(entry.name), data, init_state, args.epochs,
                                 args.batch_size, args.seed, args.impl, state_bits, args.bf16))
    print(f"digits: {len(data.x_train)} training / {len(data.x_val)} validation images, "
          f"{args.epochs} epochs of {steps_per_epoch} steps, batch {args.batch_size}, "
          f"seed {args.seed}")
    print(table(results, steps_per_epoch))
    csv_path, png_path = folder / CSV_NAME, folder / PNG_NAME
    write_csv(csv_path, results)
    plot(png_path, results, steps_per_epoch, args.epochs)
    print(f"wrote {png_path} and {csv_path}")
    return 0
