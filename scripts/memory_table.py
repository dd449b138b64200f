"""docs/memory.md's table: the digits conv net of `optcraft compare` trained with each optimizer
with its state at 32, 16, 8 and 4 bits, and with bfloat16 weights without a master copy
(stochastic rounding; state in bfloat16, the weights' dtype, and at 8 bits).

    PYTHONPATH=src python scripts/memory_table.py [--epochs 5] [--seeds 0,1]
        [--optimizers Adam,Lamb,SAdam]

For each run: the mean training loss over the last epoch, the validation loss and accuracy after
the last epoch, each the mean over the seeds; and the difference of the accuracy to the same
optimizer's float32 run (32-bit state).  Every run of one seed starts from the same weights and
sees the same batches (`optcraft compare`'s `train`).
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

from optcraft import registry
from optcraft.cli import common
from optcraft.cli.compare import train
from optcraft.data import load_digits

CONFIGS = [(32, False), (16, False), (8, False), (4, False), (None, True), (8, True)]


def label(bits, bf16) -> str:
    if bf16:
        return "bf16 weights, SR" + ("" if bits is None else f", {bits}-bit state")
    return f"{bits}-bit state"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--optimizers", default="Adam,Lamb,SAdam")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    common.few_threads()
    data = load_digits()
    steps = math.ceil(len(data.x_train) / 64)
    print(f"digits conv net (9,930 parameters; its two largest weights, 9,728 of them, are "
          f"above the 4,096-element threshold), {args.epochs} epochs of {steps} steps, batch 64, "
          f"seeds {args.seeds}, each optimizer's registry learning rate\n")
    print("| optimizer | state | train loss | val loss | val accuracy | vs float32 |")
    print("|---|---|---|---|---|---|")
    for name in args.optimizers.split(","):
        entry = registry.get(name)
        base = None
        for bits, bf16 in CONFIGS:
            losses, val_losses, accs = [], [], []
            for seed in seeds:
                init = common.digits_model(data.n_features, data.n_classes, seed).state_dict()
                r = train(entry, None, data, init, args.epochs, 64, seed, None, bits, bf16)
                if r.diverged_at is not None:
                    losses.append(float("nan"))
                    val_losses.append(float("nan"))
                    accs.append(float("nan"))
                    continue
                losses.append(r.final_train_loss(steps))
                val_losses.append(r.rows[-1]["val_loss"])
                accs.append(r.final_accuracy)
            acc = statistics.mean(accs)
            if base is None:
                base = acc
            print(f"| {name} | {label(bits, bf16)} | {statistics.mean(losses):.4f} | "
                  f"{statistics.mean(val_losses):.4f} | {acc:.4f} | {acc - base:+.4f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
