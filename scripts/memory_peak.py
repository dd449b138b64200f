"""State bytes and the peak memory a step adds, at each `state_bits`, each in a process of its own.

    PYTHONPATH=src python scripts/memory_peak.py [--scale 4] [--optimizer Adam] [--impl foreach]

GPT-2 small's parameter shapes with every width divided by `--scale` (bench's `gpt2_small`), the
optimizer built with `state_bits` 32, 16, 8 and 4 in turn, two steps taken, then the smaller of
two steps' peak extra memory and the bytes of the tensors kept in `opt.state`.

The peak (CPU, glibc): the heap's bytes in use (`mallinfo2`: small blocks plus mmap'd large
ones; torch's CPU tensors come from malloc) read after every aten operation of the step (a
`TorchDispatchMode`), minus the bytes in use before the step.  Unlike the resident-set
high-water mark (`bench.PeakMemory`), it does not depend on which freed pages malloc keeps.
Eager impls only (a compiled graph's kernels are not seen one operation at a time).
"""
from __future__ import annotations

import argparse
import subprocess
import sys


class InUsePeak:
    """The most heap bytes in use at the end of any aten operation inside the `with`, over the
    bytes in use when it began (`extra`)."""

    def __init__(self):
        import ctypes

        from torch.utils._python_dispatch import TorchDispatchMode

        class Info(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        outer = self

        def in_use():
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer.peak = max(outer.peak, in_use())
                return out

        self.in_use, self.mode = in_use, Mode()

    def __enter__(self):
        self.before = self.peak = self.in_use()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.extra = self.peak - self.before


def measure(scale: int, optimizer: str, impl: str, bits: int) -> str:
    import torch

    from optcraft import bench, state_codecs

    params = bench.make_parameters(bench.gpt2_small(scale))
    n = sum(p.numel() for p in params)
    opt = bench.ALGORITHMS[optimizer].ours(params, impl)
    state_codecs.configure(opt, state_bits=bits)
    opt.step()
    opt.step()
    peaks = []
    for _ in range(2):
        with InUsePeak() as peak:
            opt.step()
        peaks.append(peak.extra)
    inner = opt.opt if hasattr(opt, "opt") else opt
    total, _ = state_codecs.state_bytes(inner)
    largest = max(p.numel() for p in params)
    peak = "-" if None in peaks else f"{min(peaks) / 2 ** 20:.1f}"
    return (f"| {optimizer} {impl} | {bits} | {n / 1e6:.1f}M (largest {largest / 1e6:.2f}M) | "
            f"{total / 2 ** 20:.1f} | {total / n:.2f} | {peak} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--optimizer", default="Adam")
    parser.add_argument("--impl", default="foreach")
    parser.add_argument("--bits", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bits is not None:
        print(measure(args.scale, args.optimizer, args.impl, args.bits))
        return 0
    print("| optimizer | state_bits | parameters | state MiB | state B/param | "
          "peak extra MiB in a step |")
    print("|---|---|---|---|---|---|")
    for bits in (32, 16, 8, 4):
        out = subprocess.run([sys.executable, __file__, "--scale", str(args.scale),
                              "--optimizer", args.optimizer, "--impl", args.impl,
                              "--bits", str(bits)], capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
