"""Communication and step time of Muon under FSDP2 with owner ranks (docs/integration.md).

    python scripts/distributed_matrix_comm.py [ranks] [layers] [steps]

Spawns `ranks` CPU processes (gloo, 127.0.0.1), shards a stack of GPT-2-small-shaped linear
layers (per layer: 2304 x 768, 768 x 768, 3072 x 768, 768 x 3072; no biases) with FSDP2, and
runs Muon on them in float32.  Prints, per rank and per step, the elements a rank sent and
received in `run_on_owners` (optcraft.distributed.counters; 4 bytes each), the matrices it
orthogonalised, and the optimizer step's time.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]


def _run(rank, world, port, layers, steps):
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard

    import optcraft as oc
    from optcraft import distributed as ocd

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(i, o, bias=False) for _ in range(layers)
                            for (o, i) in SHAPES])
    numel = sum(p.numel() for p in model.parameters())
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = oc.Muon(model.parameters(), lr=0.02)
    times = []
    for step in range(steps + 1):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        ocd.reset_counters()
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        dist.barrier()
        if step:  # the first step makes the state
            times.append(time.perf_counter() - start)
    c = dict(ocd.counters)
    print(f"rank {rank}/{world}: model {numel} elements ({numel * 4 / 2**20:.1f} MiB); per step "
          f"sent {c['sent']} elements ({c['sent'] / numel:.3f} x model), received "
          f"{c['received']} ({c['received'] / numel:.3f} x model), orthogonalised "
          f"{c['matrices']} of {len(SHAPES) * layers} matrices; step "
          f"{1000 * sorted(times)[len(times) // 2]:.0f} ms (median of {steps})", flush=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_run, args=(world, port, layers, steps), nprocs=world, join=True,
                       start_method="spawn")
