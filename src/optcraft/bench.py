"""`optcraft bench`: optimizer steps against torch.optim and against the memory floor.

An optimizer step is memory-bound: Adam reads the parameter, its gradient and two moments and
writes three tensors.  Its *floor* is the bytes it must move divided by the machine's copy
bandwidth (measured here, with `dst.copy_(src)` on a buffer much larger than the caches).  For
each parameter set and optimizer this runs, interleaved in one process on the same parameters and
gradients:

* optcraft's optimizer in each requested impl;
* torch.optim's implementation of the same algorithm (for-loop, foreach, fused where torch has
  them);
* torch's fused AdamW, the yardstick every ratio is taken against;
* the copy whose median gives that block's bandwidth (printed as its last column).

It prints, per candidate, the median step time over `--steps` steps after `--warmup` steps, its
ratio to torch's fused AdamW, its ratio to its own memory floor, the time its first three steps
took together (compiling happens there for impl="compiled", at the second or third step), and
the peak memory one step adds (on the CPU the process's resident high-water mark during a step
minus its size before; on CUDA the allocator's peak minus what was allocated before).

`--state-bits 32,16,8,4` adds optcraft's candidates with their state stored at each of those
bits (`optcraft.state_codecs`): each row then also says the bytes of state kept per parameter
(measured from the tensors in `opt.state`, master weights and scales included) and its step
time over the same optimizer's and impl's with float32 state (`x 32-bit state`).

`--device cuda` runs it all on a GPU: the steps are timed between `torch.cuda.synchronize()` calls,
so a row is the step's whole time on the device, launches included.

`--ranks 1,2,4` times Muon's step under FSDP2 on that many processes instead, with the bytes
each rank sends (`optcraft.bench_distributed`, which has its own options).

    python -m optcraft.bench --params gpt2-small --optimizers Adam,Lamb --impls auto,compiled
    python -m optcraft.bench --params gpt2-small --optimizers Adam --impls foreach \
        --state-bits 32,16,8,4 --no-torch
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from . import state_codecs
from .optimizers import classic

MiB = 1 << 20


# ---- parameter sets ------------------------------------------------------------------------------

def gpt2_small(scale: int = 1) -> list[tuple[int, ...]]:
    """GPT-2 small's parameters (Radford et al., 2019): tied embeddings, 12 blocks of width 768,
    124M parameters.  `scale` divides every width (a smoke-sized copy)."""
    d, vocab, ctx = 768 // scale, 50257 // scale, 1024 // scale
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50(scale: int = 1) -> list[tuple[int, ...]]:
    """ResNet-50's parameters (He et al., 2016): bottleneck blocks [3, 4, 6, 3], batch-norm
    weights and biases, a 1000-way classifier; 25.6M parameters."""
    w = lambda c: max(1, c // scale)  # noqa: E731 (a width, scaled)
    shapes = [(w(64), 3, 7, 7), (w(64),), (w(64),)]
    in_ch = w(64)
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        mid, out = w(width), w(4 * width)
        for i in range(blocks):
            shapes += [(mid, in_ch, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,),
                       (out, mid, 1, 1), (out,), (out,)]
            if i == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(w(1000), in_ch), (w(1000),)]


def many_tiny(scale: int = 1) -> list[tuple[int, ...]]:
    """2,000 small tensors (biases, norms, small heads): per-tensor overheads dominate."""
    n = max(20, 2000 // scale)
    return [(64 + (i * 37) % 960,) for i in range(n)]


def gpt2_matrices(scale: int = 1) -> list[tuple[int, ...]]:
    """GPT-2 small's hidden matrices (4 per block, 85M parameters): what Muon trains (torch's
    Muon takes 2-D parameters only; the embeddings, biases and norms go to AdamW)."""
    return [s for s in gpt2_small(scale)[2:] if len(s) == 2]


PARAM_SETS: dict[str, Callable[[int], list]] = {
    "gpt2-small": gpt2_small, "gpt2-matrices": gpt2_matrices, "resnet50": resnet50,
    "many-tiny": many_tiny}


# ---- the algorithms and torch's versions of them ----------------------------------------------

@dataclasses.dataclass
class Algorithm:
    ours: Callable  # (params, impl) -> optimizer
    torch_cls: type | None = None  # torch.optim's implementation of the same algorithm
    torch_kwargs: dict = dataclasses.field(default_factory=dict)
    torch_fused: bool = False
    #: torch's variants run: "forloop" and "foreach" (its `foreach=` flag), or just "" for an
    #: optimizer without that flag (torch's Muon)
    torch_variants: tuple = ("forloop", "foreach")


ALGORITHMS = {
    "Adam": Algorithm(lambda ps, impl: classic.Adam(ps, lr=1e-3, wd=0.01, impl=impl),
                      torch.optim.AdamW, dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-5,
                                              weight_decay=0.01), torch_fused=True),
    "SGD": Algorithm(lambda ps, impl: classic.SGD(ps, lr=1e-2, mom=0.9, impl=impl),
                     torch.optim.SGD, dict(lr=1e-2, momentum=0.9), torch_fused=True),
    "RMSProp": Algorithm(lambda ps, impl: classic.RMSProp(ps, lr=1e-3, impl=impl),
                         torch.optim.RMSprop, dict(lr=1e-3, alpha=0.99, eps=1e-8)),
    "RAdam": Algorithm(lambda ps, impl: classic.RAdam(ps, lr=1e-3, impl=impl),
                       torch.optim.RAdam, dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-5)),
    "QHAdam": Algorithm(lambda ps, impl: classic.QHAdam(ps, lr=1e-3, impl=impl)),
    "Larc": Algorithm(lambda ps, impl: classic.Larc(ps, lr=1e-2, impl=impl)),
    "Lamb": Algorithm(lambda ps, impl: classic.Lamb(ps, lr=1e-3, impl=impl)),
    "ranger": Algorithm(lambda ps, impl: classic.ranger(ps, lr=1e-3, impl=impl)),
}


def _modern_algorithms() -> dict[str, Algorithm]:
    """The optimizers people train with today (docs/modern.md), each beside torch's own where
    torch has it, with torch's defaults."""
    from .optimizers import lr_free, matrix, modern, torch_family

    def ours(factory, **kwargs):
        return lambda ps, impl: factory(ps, impl=impl, **kwargs)
    return {
        "Muon": Algorithm(ours(matrix.Muon, lr=0.02), torch.optim.Muon, dict(lr=0.02),
                          torch_variants=("",)),
        "Adafactor": Algorithm(ours(matrix.Adafactor), torch.optim.Adafactor, {}),
        "SOAP": Algorithm(ours(matrix.SOAP)),
        "Lion": Algorithm(ours(modern.Lion)),
        "ADOPT": Algorithm(ours(modern.ADOPT)),
        "Adan": Algorithm(ours(modern.Adan)),
        "MARS": Algorithm(ours(modern.MARS)),
        "AdamWScheduleFree": Algorithm(ours(lr_free.AdamWScheduleFree)),
        "Prodigy": Algorithm(ours(lr_free.Prodigy)),
        "Adagrad": Algorithm(ours(torch_family.Adagrad), torch.optim.Adagrad, {},
                             torch_fused=True),
        "Adamax": Algorithm(ours(torch_family.Adamax), torch.optim.Adamax, {}),
        "NAdam": Algorithm(ours(torch_family.NAdam), torch.optim.NAdam, {}),
        "Adadelta": Algorithm(ours(torch_family.Adadelta), torch.optim.Adadelta, {}),
        "ASGD": Algorithm(ours(torch_family.ASGD), torch.optim.ASGD, {}),
        "Rprop": Algorithm(ours(torch_family.Rprop), torch.optim.Rprop, {}),
    }


def _research_algorithms() -> dict[str, Algorithm]:
    """The research optimizers, when their module is there, with their default hyperparameters."""
    try:
        from .optimizers import research
    except ImportError:
        return {}
    found = {}
    for name in getattr(research, "__all__", ()):
        factory = getattr(research, name)
        if callable(factory) and name[:1].isupper():
            found[name] = Algorithm(lambda ps, impl, f=factory: f(ps, lr=1e-3, impl=impl))
    return found


# ---- measuring ---------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """The memory a block of code adds at its peak: on the CPU the resident-set high-water mark
    minus the size before (Linux: /proc/self/clear_refs resets the mark; None where the platform
    has no such counter); on CUDA the caching allocator's peak minus what was allocated before."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        self.before = _read_status("VmRSS")
        if self.before is not None:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.before = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.before
            return
        peak = _read_status("VmHWM")
        self.extra = None if self.before is None or peak is None else max(0, peak - self.before)


def _read_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclasses.dataclass
class Candidate:
    label: str
    optimizer: torch.optim.Optimizer
    device: torch.device = torch.device("cpu")
    times: list = dataclasses.field(default_factory=list)
    peak: int | None = None

    def step(self, measure_memory: bool = False) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        if measure_memory:
            with PeakMemory(self.device) as peak:
                self.optimizer.step()
                synchronize(self.device)
            self.peak = peak.extra
        else:
            self.optimizer.step()
            synchronize(self.device)
        self.times.append(time.perf_counter() - start)


class CopyProbe:
    """A copy timed in the same interleaved loop as the candidates, so that each block of rows has
    the bandwidth of its own minutes (on a shared machine it drifts, by 2x here between runs)."""

    def __init__(self, nbytes: int, device: torch.device = torch.device("cpu")):
        self.nbytes = nbytes
        self.device = device
        self.src = torch.ones(nbytes // 4, device=device)
        self.dst = torch.empty_like(self.src)
        self.times: list = []

    def step(self, measure_memory: bool = False) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        self.dst.copy_(self.src)
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)

    def bandwidth(self, warmup: int) -> float:
        """Bytes per second moved (each byte read once and written once), from the median."""
        return 2 * self.nbytes / statistics.median(self.times[warmup:])


def copy_bandwidth(nbytes: int = 512 * MiB, repeats: int = 5,
                   device: torch.device = torch.device("cpu")) -> float:
    """Bytes per second that `dst.copy_(src)` moves (each byte read once and written once): the
    median of `repeats` copies after one untimed."""
    probe = CopyProbe(nbytes, device)
    for _ in range(1 + repeats):
        probe.step()
    return probe.bandwidth(warmup=1)


def floor_seconds(optimizer: torch.optim.Optimizer, bandwidth: float) -> float:
    """The bytes a step must move over the bandwidth: each parameter read and written, its
    gradient read, and each parameter-sized state tensor read and written, at its own size
    (8-/4-bit state: its codes and block scales)."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            encoded = {k for k in st if state_codecs.parse_scale_key(k) is not None}
            encoded |= {state_codecs.parse_scale_key(k)[0] for k in encoded}
            moved = sum(v.numel() * v.element_size() for k, v in st.items()
                        if isinstance(v, torch.Tensor) and
                        (k in encoded or (v.numel() == p.numel() and p.numel() > 1)))
            total += 3 * p.numel() * p.element_size() + 2 * moved
    return total / bandwidth


def make_candidates(name: str, algorithm: Algorithm, params: list, impls: list[str],
                    with_torch: bool, state_bits: list[int] | None = None) -> list[Candidate]:
    """torch's fused AdamW, ours in each impl (at each of `state_bits`; None: as the recipe
    keeps it, unlabelled), then torch's variants."""
    device = params[0].device
    found = [Candidate("torch AdamW fused", torch.optim.AdamW(
        params, lr=1e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01, fused=True), device)]
    for impl in impls:
        for bits in state_bits or [None]:
            try:
                opt = algorithm.ours(params, impl)
            except ValueError:
                break  # e.g. impl="fused" for a chain torch has no kernel for
            label = f"optcraft {name} {impl}"
            if bits is not None:
                state_codecs.configure(opt, state_bits=bits)
                label += f" {bits}-bit"
            found.append(Candidate(label, opt, device))
    if with_torch and algorithm.torch_cls is not None:
        flags_of = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "": {}}
        variants = {v: flags_of[v] for v in algorithm.torch_variants}
        if algorithm.torch_fused:
            variants["fused"] = dict(fused=True)
        for variant, flags in variants.items():
            if (name, variant) == ("Adam", "fused"):
                continue  # the yardstick itself
            label = f"torch {algorithm.torch_cls.__name__} {variant}".rstrip()
            found.append(Candidate(label, algorithm.torch_cls(params, **algorithm.torch_kwargs,
                                                              **flags), device))
    return found


def make_parameters(shapes: list, device: torch.device = torch.device("cpu")) -> list:
    """Parameters of these shapes on `device`, with gradients: seeded, of a trained network's
    scale (weights about 0.02, gradients about 1e-3)."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).mul_(0.02).to(device).requires_grad_()
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).mul_(1e-3).to(device)
    return params


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float | None:
    """Bytes of tensors kept in the optimizer's state per parameter that has state (measured
    from the tensors themselves: codes, scales, moments, master weights, Lookahead's slow
    weights), or None before any state."""
    inner = optimizer
    while not hasattr(inner, "chains") and hasattr(inner, "opt"):
        inner = inner.opt
    total, params = state_codecs.state_bytes(inner)
    return total / params if params else None


def run_set(set_name: str, scale: int, names: list[str], impls: list[str], steps: int,
            warmup: int, with_torch: bool, copy_bytes: int, progress=print,
            device: torch.device = torch.device("cpu"),
            state_bits: list[int] | None = None) -> list[dict]:
    """Each optimizer's candidates, torch's fused AdamW (the yardstick) and a copy (the floor's
    bandwidth) stepped in turn, `warmup + steps` rounds; one row per candidate."""
    params = make_parameters(PARAM_SETS[set_name](scale), device)
    numel = sum(p.numel() for p in params)
    rows = []
    algorithms = {**ALGORITHMS, **_modern_algorithms(), **_research_algorithms()}
    for name in names:
        candidates = make_candidates(name, algorithms[name], params, impls, with_torch,
                                     state_bits)
        progress(f"{set_name} ({len(params)} tensors, {numel / 1e6:.1f}M parameters): {name}, "
                 f"{len(candidates)} candidates")
        probe = CopyProbe(copy_bytes, device)
        for i in range(warmup + steps):
            probe.step()
            for c in candidates:
                c.step(measure_memory=(i == warmup))
        yardstick = statistics.median(candidates[0].times[warmup:])
        bandwidth = probe.bandwidth(warmup)
        float32 = {c.label[:-len(" 32-bit")]: statistics.median(c.times[warmup:])
                   for c in candidates if c.label.endswith(" 32-bit")}
        for c in candidates:
            median = statistics.median(c.times[warmup:])
            floor = floor_seconds(c.optimizer, bandwidth)
            base = float32.get(c.label.rsplit(" ", 1)[0]) if c.label.endswith("-bit") else None
            rows.append(dict(params=set_name, candidate=c.label, median_ms=1e3 * median,
                             vs_fused_adamw=median / yardstick, vs_floor=median / floor,
                             first_steps_s=sum(c.times[:3]),
                             peak_extra_mib=None if c.peak is None else c.peak / MiB,
                             bandwidth_gbs=bandwidth / 1e9,
                             state_bytes=state_bytes_per_param(c.optimizer)
                             if state_bits and c.label.startswith("optcraft") else None,
                             vs_32bit=None if base is None else median / base))
        del candidates, probe
    return rows


# ---- reporting -------------------------------------------------------------------------------

COLUMNS = [("params", "params", "{}"), ("candidate", "candidate", "{}"),
           ("median_ms", "median ms", "{:.2f}"), ("vs_fused_adamw", "x torch fused AdamW", "{:.2f}"),
           ("vs_floor", "x own floor", "{:.2f}"), ("first_steps_s", "first 3 steps s", "{:.2f}"),
           ("peak_extra_mib", "peak extra MiB", "{:.0f}"),
           ("bandwidth_gbs", "copy GB/s", "{:.1f}")]
#: the columns of a run with --state-bits
STATE_COLUMNS = [("state_bytes", "state B/param", "{:.2f}"),
                 ("vs_32bit", "x 32-bit state", "{:.2f}")]


def _cell(row, key, fmt):
    return "-" if row[key] is None else fmt.format(row[key])


def table(rows: list[dict], markdown: bool = False) -> str:
    columns = COLUMNS + (STATE_COLUMNS if any(r.get("state_bytes") is not None for r in rows)
                         else [])
    head = [title for _, title, _ in columns]
    body = [[_cell(r, key, fmt) for key, _, fmt in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def machine(device: torch.device = torch.device("cpu")) -> str:
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    return (f"{gpu}{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python "
            f"{platform.python_version()}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="optcraft bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="gpt2-small",
                        help=f"comma-separated parameter sets: {', '.join(PARAM_SETS)}")
    parser.add_argument("--optimizers", default="Adam,SGD,Lamb",
                        help="comma-separated optimizers (optcraft's names)")
    parser.add_argument("--impls", default="auto,foreach,compiled",
                        help="comma-separated impls: reference, foreach, fused, compiled, auto")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--size", choices=["full", "smoke"], default="full",
                        help="smoke: every width divided by 16 (a quick check, e.g. in CI)")
    parser.add_argument("--device", default="cpu",
                        help="where the parameters live: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.optim's variants")
    parser.add_argument("--ranks", metavar="N,N,...",
                        help="Muon under FSDP2 on N processes each instead (optcraft."
                             "bench_distributed; `optcraft bench --ranks 1 --help`)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--state-bits", default=None, metavar="BITS",
                        help="comma-separated state bits for optcraft's candidates (32, 16, 8, "
                             "4): a row each, with its state bytes per parameter and its time "
                             "over 32-bit state's (see optcraft.state_codecs)")
    args = parser.parse_args(argv)
    if args.state_bits is not None:
        bits = _choices(parser, "--state-bits", args.state_bits,
                        [str(b) for b in state_codecs.STATE_BITS])
        args.state_bits = [int(b) for b in bits]
    algorithms = {**ALGORITHMS, **_modern_algorithms(), **_research_algorithms()}
    args.params = _choices(parser, "--params", args.params, PARAM_SETS)
    args.optimizers = _choices(parser, "--optimizers", args.optimizers, algorithms)
    args.impls = _choices(parser, "--impls", args.impls,
                          ("reference", "foreach", "fused", "compiled", "auto"))
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {args.device} is not supported; cpu or cuda")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {args.device} asked for, but this torch sees no CUDA device")
    return args


def _choices(parser, flag: str, text: str, known) -> list[str]:
    import difflib

    chosen = [x.strip() for x in text.split(",") if x.strip()]
    for x in chosen:
        if x not in known:
            close = difflib.get_close_matches(x, list(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            parser.error(f"{flag}: unknown {x!r}{hint}; known: {', '.join(known)}")
    if not chosen:
        parser.error(f"{flag}: give at least one")
    return chosen


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--ranks" or a.startswith("--ranks=") for a in argv):
        # Muon under FSDP2 on several processes: its own options (optcraft.bench_distributed)
        from . import bench_distributed
        return bench_distributed.main(argv)
    args = parse_args(argv)
    scale = 16 if args.size == "smoke" else 1
    copy_bytes = 32 * MiB if args.size == "smoke" else 512 * MiB
    bandwidth = copy_bandwidth(copy_bytes, device=args.device)
    print(f"machine: {machine(args.device)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s at start",
          file=sys.stderr)
    rows = []
    for set_name in args.params:
        rows += run_set(set_name, scale, args.optimizers, args.impls, args.steps, args.warmup,
                        not args.no_torch, copy_bytes,
                        progress=lambda text: print(text, file=sys.stderr, flush=True),
                        device=args.device, state_bits=args.state_bits)
    print(table(rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
