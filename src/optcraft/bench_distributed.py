"""`optcraft bench --ranks 1,2,4`: Muon's optimizer step under FSDP2 on 1, 2, 4, ... CPU processes
(gloo, 127.0.0.1), with the bytes each rank sends during the step.

For each number of ranks this spawns that many processes; each shards the parameters of
`--params` (their matrices: Muon's) with FSDP2's `fully_shard`, gives them random gradients and
times `opt.step()` of `optcraft.Muon` between two barriers (so a step lasts until the slowest rank
is done).  After the timed steps, one more step runs under `SentBytes`, which sees every
collective of torch.distributed's process group and adds up the bytes this rank sends (see its
docstring for what "sent" means for each collective).  Beside the measured bytes each row
gives `predicted_bytes`, the documented formula (docs/integration.md) for the owners the step used,
and both against the model's size.

The reference is Muon in one process, on plain tensors without a process group, timed in the
bench's own process before the spawned runs and again after them.  Every process, the reference
included, computes on one thread: N ranks use N cores (where the machine has them).

    optcraft bench --ranks 1,2,4 --params gpt2-matrices --steps 3 --warmup 1
    python -m optcraft.bench_distributed --ranks 1,2 --size smoke
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

#: The elements Muon's whole-matrix block is given per matrix and gathered on its owner: the
#: parameter, its gradient and the momentum (`grad_avg`, updated on the shards before).
MUON_READS = 3
#: The collectives that carry the matrices (the rest, an all-gather of small descriptions, says
#: what changed).
MATRIX_DATA = ("gather", "scatter", "broadcast")
#: How long a rank waits for the others before it fails (instead of hanging).
TIMEOUT = datetime.timedelta(minutes=10)


# ---- counting the bytes a rank sends -----------------------------------------------------------

def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


class SentBytes:
    """A context manager counting, per collective, the calls and the bytes this rank sends while it
    is active.  It wraps the methods of torch's `ProcessGroup` (`gather`, `scatter`, `broadcast`,
    `allgather`, `allreduce`, ...), through which torch.distributed's functions (`dist.gather`,
    `dist.all_gather_object`, ...) reach the backend; each call is passed on unchanged.  (Not a
    `TorchDispatchMode`: under one, torch's in-place foreach operations do not move their tensors'
    version counters, which `optcraft.distributed.run_on_owners` reads to know what a block wrote.)
    Functional collectives (DTensor's redistributions) do not go through these methods and are not
    counted; Muon's owner scheme does not use them.

    "Sent" is each collective's payload from this rank to the others, whatever algorithm the backend
    uses: a gather sends this rank's input to the root (the root sends nothing); a scatter sends,
    from the root, every other rank's piece; a broadcast sends the tensor from the root to each of
    the `N - 1` others; an all-gather sends this rank's input to each of the `N - 1` others; an
    all-reduce counts as a ring's, `2 (N - 1) / N` of the tensor."""

    RULES = {"gather": "to_root", "scatter": "from_root", "broadcast": "from_root_to_all",
             "allgather": "to_all", "_allgather_base": "to_all", "allreduce": "ring_reduce"}

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def __enter__(self):
        from torch._C._distributed_c10d import ProcessGroup

        self._originals = {name: getattr(ProcessGroup, name) for name in self.RULES}
        for name, method in self._originals.items():
            setattr(ProcessGroup, name, self._counting(name, method))
        return self

    def __exit__(self, *exc):
        from torch._C._distributed_c10d import ProcessGroup

        for name, method in self._originals.items():
            setattr(ProcessGroup, name, method)

    def _counting(self, name: str, method):
        def counted(group, *args, **kwargs):
            self._count(name, group, args)
            return method(group, *args, **kwargs)
        return counted

    def _count(self, op: str, group, args: tuple) -> None:
        rule = self.RULES[op]
        me, world = group.rank(), group.size()
        root = getattr(args[-1], "rootRank", None) if args else None
        if rule == "to_root":
            sent = 0 if me == root else _nbytes(args[1])
        elif rule == "from_root":
            pieces = args[1][0] if me == root else []
            sent = sum(_nbytes(t) for r, t in enumerate(pieces) if r != me)
        elif rule == "from_root_to_all":
            sent = _nbytes(args[0]) * (world - 1) if me == root else 0
        elif rule == "to_all":
            sent = _nbytes(args[1]) * (world - 1)
        else:
            sent = _nbytes(args[0]) * 2 * (world - 1) // world
        self.calls[op] = self.calls.get(op, 0) + 1
        self.bytes[op] = self.bytes.get(op, 0) + sent


# ---- the formula -------------------------------------------------------------------------------

def predicted_bytes(shapes: list, owners: list[int], world: int, rank: int,
                    reads: int = MUON_READS, element_size: int = 4) -> int:
    """The bytes `rank` sends in one step of a whole-matrix block that reads `reads` sharded
    tensors per matrix and writes the parameter (docs/integration.md): for each matrix owned by
    another rank, its rows of the `reads` tensors (gathered on the owner); for each matrix it owns,
    the other ranks' rows of the new parameter (scattered back).  FSDP2 splits the rows as
    `torch.chunk` does and optcraft pads every rank's rows to the chunk's, so a rank's rows count
    `ceil(rows / world)`; with `rows` a multiple of `world` this is `reads M_other / N + M_own
    (N - 1) / N` elements."""
    sent = 0
    for shape, owner in zip(shapes, owners):
        chunk = -(-shape[0] // world) * math.prod(shape[1:])
        sent += (world - 1) * chunk if owner == rank else reads * chunk
    return sent * element_size if world > 1 else 0


# ---- one rank ----------------------------------------------------------------------------------

def _parameters(shapes: list, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def _gradients(params: list, step: int) -> list:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _rank(rank: int, world: int, port: int, shapes: list, steps: int, warmup: int,
          threads: int, out_dir: str) -> None:
    """One process of a run: FSDP2 over `world` ranks, Muon's step timed and counted; its results
    saved to `out_dir/rank<rank>.pt`."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from . import distributed as ocd
    from .optimizers.matrix import Muon

    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        model = torch.nn.Module()
        model.weights = torch.nn.ParameterList(_parameters(shapes))
        fully_shard(model)
        params = list(model.parameters())
        mesh = params[0].device_mesh
        opt = Muon(params, lr=0.02)
        times = []
        for step in range(warmup + steps + 1):
            # the same whole gradients as the single process's, each rank given its rows
            for p, g in zip(params, _gradients(params, step)):
                p.grad = distribute_tensor(g, mesh, p.placements)
            ocd.reset_counters()
            dist.barrier()
            if step < warmup + steps:
                start = time.perf_counter()
                opt.step()
                dist.barrier()
                if step >= warmup:
                    times.append(time.perf_counter() - start)
            else:
                with SentBytes() as sent:
                    opt.step()
                dist.barrier()
        owners = ocd.assign_owners(shapes, world)
        whole = [p.full_tensor() for p in params]  # a collective: on every rank
        result = {"times": times, "bytes": dict(sent.bytes), "calls": dict(sent.calls),
                  "sent": sent.total, "matrices": ocd.counters["matrices"],
                  "predicted": predicted_bytes(shapes, owners, world, rank),
                  "params": whole if rank == 0 else None}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave()


def _leave() -> None:
    """End this process now, its result saved, without the interpreter's teardown: a gloo worker
    thread still releasing the last collectives' tensors (which needs the interpreter) is killed
    there and aborts the process (docs/integration.md, the torchrun example)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def run_ranks(shapes: list, world: int, steps: int = 3, warmup: int = 1,
              threads: int = 1) -> list[dict]:
    """Muon's step under FSDP2 on `world` spawned processes: each rank's results (`times`, the
    step's seconds; `bytes` and `calls` per collective and `sent` in all, from `SentBytes`;
    `matrices`, those it orthogonalised; `predicted`, `predicted_bytes` for the owners
    `optcraft.distributed.assign_owners` gives the whole list, as the step assigns them when the
    matrices are one bucket; rank 0's `params`, whole, after the last step)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, timeout=TIMEOUT,
                          wait_for_workers=False)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(world, store.port, shapes, steps, warmup, threads,
                                        out_dir), nprocs=world, join=True, start_method="spawn")
        del store
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True)
                for r in range(world)]


def single_process(shapes: list, steps: int = 3, warmup: int = 1,
                   threads: int = 1) -> tuple[list, list]:
    """Muon on plain tensors in this process (the reference), on `threads` threads as each rank:
    the step times and the parameters after `warmup + steps + 1` steps on the gradients the ranks
    get."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _single_process(shapes, steps, warmup)
    finally:
        torch.set_num_threads(previous)


def _single_process(shapes: list, steps: int, warmup: int) -> tuple[list, list]:
    from .optimizers.matrix import Muon

    params = _parameters(shapes)
    opt = Muon(params, lr=0.02)
    times = []
    for step in range(warmup + steps + 1):
        for p, g in zip(params, _gradients(params, step)):
            p.grad = g
        start = time.perf_counter()
        opt.step()
        if warmup <= step < warmup + steps:
            times.append(time.perf_counter() - start)
    return times, [p.detach() for p in params]


# ---- the command -------------------------------------------------------------------------------

def measure(shapes: list, ranks: list[int], steps: int, warmup: int, progress=None) -> list[dict]:
    """A row per number of ranks, and the single-process reference timed before and after."""
    def say(text):
        if progress:
            progress(text)

    numel = sum(math.prod(s) for s in shapes)
    before, _ = single_process(shapes, steps, warmup)
    say(f"one process, plain tensors: {1000 * statistics.median(before):.0f} ms")
    rows = []
    for world in ranks:
        results = run_ranks(shapes, world, steps, warmup)
        step = statistics.median(results[0]["times"])
        matrix = [sum(r["bytes"].get(op, 0) for op in MATRIX_DATA) for r in results]
        rows.append({"ranks": world, "step_ms": 1000 * step,
                     "matrices": [r["matrices"] for r in results],
                     "sent_mib": [m / 2**20 for m in matrix],
                     "predicted_mib": [r["predicted"] / 2**20 for r in results],
                     "model_x": max(matrix) / (4 * numel),
                     "other_bytes": max(r["sent"] - m for r, m in zip(results, matrix))})
        say(f"{world} rank{'s' if world > 1 else ''}: {rows[-1]['step_ms']:.0f} ms")
    after, _ = single_process(shapes, steps, warmup)
    reference = statistics.median(before + after)
    for row in rows:
        row["x_single"] = row["step_ms"] / (1000 * reference)
    rows.insert(0, {"ranks": "1, no process group", "step_ms": 1000 * reference,
                    "matrices": [len(shapes)], "sent_mib": [0.0], "predicted_mib": [0.0],
                    "model_x": 0.0, "other_bytes": 0, "x_single": 1.0,
                    "before_after_ms": (1000 * statistics.median(before),
                                        1000 * statistics.median(after))})
    return rows


def table(rows: list[dict], numel: int, markdown: bool = False) -> str:
    head = ["ranks", "step (ms)", "x one process", "matrices per rank",
            "matrix data sent per rank (MiB)", "formula (MiB)", "most / model",
            "other bytes"]
    lines = []
    for row in rows:
        lines.append([str(row["ranks"]), f"{row['step_ms']:.0f}", f"{row['x_single']:.2f}",
                      " / ".join(str(m) for m in row["matrices"]),
                      " / ".join(f"{s:.2f}" for s in row["sent_mib"]),
                      " / ".join(f"{s:.2f}" for s in row["predicted_mib"]),
                      f"{row['model_x']:.3f}", str(row["other_bytes"])])
    model = (f"model: {numel:,} elements, {4 * numel / 2**20:.1f} MiB in float32; matrix data: "
             f"gather, scatter and broadcast; other bytes: the all_gather_object of what "
             f"changed (the largest rank's)")
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out + ["", model])
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in [head, *lines]]
    return "\n".join(out + [model])


def parse_args(argv):
    from .bench import PARAM_SETS

    parser = argparse.ArgumentParser(prog="optcraft bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", required=True, metavar="N,N,...",
                        help="comma-separated numbers of processes, e.g. 1,2,4")
    parser.add_argument("--params", default="gpt2-matrices",
                        help="a parameter set of `optcraft bench`; Muon takes its matrices "
                             "(default: gpt2-matrices)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--size", choices=["full", "smoke"], default="full",
                        help="smoke: every width divided by 16")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    try:
        args.ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--ranks: {args.ranks!r} is not a list of numbers, e.g. 1,2,4")
    if not args.ranks or any(r < 1 for r in args.ranks):
        parser.error("--ranks: give numbers of processes of at least 1, e.g. 1,2,4")
    if args.params not in PARAM_SETS:
        parser.error(f"--params: unknown {args.params!r}; known: {', '.join(PARAM_SETS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    import torch.distributed as dist

    from .bench import PARAM_SETS, machine

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not dist.is_available() or not dist.is_gloo_available():
        print("optcraft bench --ranks: this torch has no torch.distributed with gloo",
              file=sys.stderr)
        return 1
    shapes = [s for s in PARAM_SETS[args.params](16 if args.size == "smoke" else 1)
              if len(s) == 2]
    if not shapes:
        print(f"optcraft bench --ranks: {args.params} has no matrices for Muon", file=sys.stderr)
        return 1
    print(f"machine: {machine()}; Muon on {len(shapes)} matrices of {args.params}",
          file=sys.stderr)
    rows = measure(shapes, args.ranks, args.steps, args.warmup,
                   progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(table(rows, sum(math.prod(s) for s in shapes), markdown=args.markdown))
    before, after = rows[0]["before_after_ms"]
    print(f"one process, plain tensors: {before:.0f} ms before the spawned runs, {after:.0f} ms "
          f"after (the reference is the median of both)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
