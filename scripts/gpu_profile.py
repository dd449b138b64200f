"""Where a step's time goes on a GPU: the host launching it against the device running it.

    python scripts/gpu_profile.py OUT_DIR [--cases Adam:auto,Lamb:compiled] [--chunks 4,12]

For each optimizer and impl on GPT-2 small's parameters (CUDA): the time the first three steps
took (compiling included), the median time `step()` takes to return (the host launching kernels)
and the median time until the device has finished it, then a torch.profiler table of three steps
(all in OUT_DIR/profiles.txt).  A step whose host time is close to its device time is bound by
launches, not by memory.  `--chunks` runs the compiled cases once per value of
`optcraft.engine.compiled.CHUNK_TENSORS` (the most same-shaped tensors one graph holds).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from optcraft import bench
from optcraft.engine import compiled

DEFAULT_CASES = "Adam:auto,Adam:foreach,Adam:compiled,Lamb:foreach,Lamb:compiled,SGD:compiled"


def measure(opt, steps: int = 20) -> tuple[float, float, float]:
    """(first three steps s, median host ms, median device ms)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(2):
        opt.step()
    host, total = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        total.append(time.perf_counter() - start)
    return first, 1e3 * statistics.median(host), 1e3 * statistics.median(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--chunks", default=str(compiled.CHUNK_TENSORS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    params = bench.make_parameters(bench.gpt2_small(), torch.device("cuda"))
    tables = []
    print(f"{'optimizer':<26} {'first 3 s':>9} {'host ms':>8} {'device ms':>10}")
    for case in args.cases.split(","):
        name, impl = case.split(":")
        chunks = [int(c) for c in args.chunks.split(",")] if impl == "compiled" else [None]
        for chunk in chunks:
            if chunk is not None:
                compiled.CHUNK_TENSORS = chunk
            label = f"{name} {impl}" + (f" chunk {chunk}" if chunk is not None else "")
            opt = bench.ALGORITHMS[name].ours(params, impl)
            first, host, device = measure(opt)
            print(f"{label:<26} {first:9.2f} {host:8.2f} {device:10.2f}", flush=True)
            with torch.profiler.profile() as prof:
                for _ in range(3):
                    opt.step()
                torch.cuda.synchronize()
            tables.append(f"== {label}\n" + prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=15))
            (args.out / "profiles.txt").write_text("\n\n".join(tables))
            del opt


if __name__ == "__main__":
    main()
