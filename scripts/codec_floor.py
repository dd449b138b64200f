"""What the 8-bit state codec costs inside a compiled step, beside the float32 step it wraps.

Compiled as optcraft's compiled path compiles a step (traced by `make_fx`, which runs the
codec's Python as it is, then `torch.compile`) on one tensor of N float32 elements, each a median of interleaved runs:

* `float32 Adam`: the whole step on float32 state (reads p, g, m, v; writes p, m, v);
* `decode`: one moment's codes and block scales to float32 (what the 8-bit step adds before
  the chain, per moment), the code map read as `optcraft.state_codecs` does in a compiled step;
* `encode`: one moment's block absmax and codes (`nearest_codes`), what it adds after;
* `8-bit Adam`: the whole step as optcraft's compiled path writes it, both moments decoded
  and encoded.

An 8-bit step decodes and encodes two moments, so `2 x (decode + encode)` over `float32 Adam`
bounds from below what compiled 8-bit state costs against float32 state on this machine.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/codec_floor.py [--numel N]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from optcraft import state_codecs as sc

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


def adam(p, g, m, v):
    m = m * B1 + g * (1 - B1)
    v = v * B2 + g * g * (1 - B2)
    return p - LR * m / (v.sqrt() + EPS), m, v


def decode(codes, absmax, signed):
    table = torch.tensor(sc.code_map(8, signed), dtype=torch.float32)
    return sc._decode_rows(codes, absmax, 8, table).view(-1)


def encode(x, signed):
    find = functools.partial(sc.nearest_codes, bits=8, signed=signed)
    return sc._encode_rows(sc._blocks(x, 8), 8, find)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=8 << 20)
    parser.add_argument("--repeats", type=int, default=7)
    n = parser.parse_args().numel
    repeats = parser.parse_args().repeats
    g = torch.Generator().manual_seed(0)
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    mc, ma = sc.quantize(m, 8, True)
    vc, va = sc.quantize(v, 8, False)
    out = torch.empty(n)

    def float32_adam(p, grad, m, v):
        p2, m2, v2 = adam(p, grad, m, v)
        p.copy_(p2), m.copy_(m2), v.copy_(v2)

    def decode_only(mc, ma, out):
        out.copy_(decode(mc, ma, True))

    def encode_only(m, mc, ma):
        codes, top = encode(m, True)
        mc.copy_(codes), ma.copy_(top)

    def eight_bit_adam(p, grad, mc, ma, vc, va):
        p2, m2, v2 = adam(p, grad, decode(mc, ma, True), decode(vc, va, False))
        p.copy_(p2)
        for new, codes, top, signed in ((m2, mc, ma, True), (v2, vc, va, False)):
            c, t = encode(new, signed)
            codes.copy_(c), top.copy_(t)

    def compiled(fn, *args):
        step = torch.compile(make_fx(fn)(*args))
        return lambda: step(*args)

    float32_adam = compiled(float32_adam, p, grad, m, v)
    decode_only = compiled(decode_only, mc, ma, out)
    encode_only = compiled(encode_only, m, mc, ma)
    eight_bit_adam = compiled(eight_bit_adam, p, grad, mc, ma, vc, va)
    runs = {"float32 Adam": float32_adam, "decode (one moment)": decode_only,
            "encode (one moment)": encode_only, "8-bit Adam": eight_bit_adam}
    for run in runs.values():  # compile, warm
        run(), run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["float32 Adam"])
    print(f"{n:,} elements, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"| {name} | {ms:.2f} ms | x {ms / 1e3 / base:.2f} |")
    floor = 2 * (statistics.median(times["decode (one moment)"]) +
                 statistics.median(times["encode (one moment)"])) / base
    print(f"2 x (decode + encode) / float32 Adam: {floor:.2f}")


if __name__ == "__main__":
    main()
