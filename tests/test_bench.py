"""The benchmark's pieces (no timing is asserted: speed is reported in BENCHMARKS.md)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import optcraft as oc
from optcraft import bench


def test_parameter_sets_have_the_published_sizes():
    """GPT-2 small has 124,439,808 parameters (tied embeddings) and torchvision's ResNet-50
    25,557,032: the shapes are the real models'."""
    count = lambda shapes: sum(math.prod(s) for s in shapes)  # noqa: E731
    assert count(bench.gpt2_small()) == 124_439_808
    assert len(bench.gpt2_small()) == 148
    assert count(bench.resnet50()) == 25_557_032
    assert len(bench.many_tiny()) == 2000


def test_floor_counts_the_bytes_adam_must_move():
    """Adam reads p, g, two moments and writes p and the moments: 7 float32 tensors per
    parameter, over the bandwidth."""
    params = [torch.zeros(10, 10, requires_grad=True), torch.zeros(5, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = oc.Adam(params, lr=1e-3)
    opt.step()
    assert bench.floor_seconds(opt, bandwidth=1.0) == 7 * 4 * 105
    sgd = oc.SGD(params, lr=1e-3)  # no state: read p and g, write p
    sgd.step()
    assert bench.floor_seconds(sgd, bandwidth=1.0) == 3 * 4 * 105
    # 8-bit state of a 64 x 128 weight: two moments of 8,192 one-byte codes and 32 float32
    # scales each, read and written
    w = torch.zeros(64, 128, requires_grad=True)
    w.grad = torch.ones_like(w)
    small = oc.Adam([w], lr=1e-3, state_bits=8)
    small.step()
    assert bench.floor_seconds(small, bandwidth=1.0) == \
        3 * 4 * 8192 + 2 * 2 * (8192 + 4 * 32)


def test_candidates_are_ours_in_each_impl_next_to_torchs():
    params = [torch.zeros(3, requires_grad=True)]
    labels = [c.label for c in bench.make_candidates(
        "Adam", bench.ALGORITHMS["Adam"], params, ["auto", "fused", "compiled"], True)]
    assert labels == ["torch AdamW fused", "optcraft Adam auto", "optcraft Adam fused",
                      "optcraft Adam compiled", "torch AdamW forloop", "torch AdamW foreach"]
    # torch has no fused Lamb: the fused impl is left out, not faked
    labels = [c.label for c in bench.make_candidates(
        "Lamb", bench.ALGORITHMS["Lamb"], params, ["fused", "foreach"], True)]
    assert labels == ["torch AdamW fused", "optcraft Lamb foreach"]


def test_smoke_run_prints_a_row_per_candidate():
    """What CI runs: the tiny size, two optimizers, eager impls, through `python -m`."""
    out = subprocess.run(
        [sys.executable, "-m", "optcraft.bench", "--size", "smoke", "--params", "many-tiny",
         "--optimizers", "Adam,Lamb", "--impls", "foreach,auto", "--steps", "2", "--warmup", "1",
         "--markdown"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("| params | candidate | median ms | x torch fused AdamW")
    rows = [line.split("|")[2].strip() for line in lines[2:]]
    assert rows == ["torch AdamW fused", "optcraft Adam foreach", "optcraft Adam auto",
                    "torch AdamW forloop", "torch AdamW foreach",
                    "torch AdamW fused", "optcraft Lamb foreach", "optcraft Lamb auto"]
    yardstick_ratios = [line.split("|")[4].strip() for line in lines[2:]
                        if "torch AdamW fused" in line]
    assert yardstick_ratios == ["1.00", "1.00"]
    assert "copy bandwidth" in out.stderr
    # each block's floor uses the bandwidth of a copy timed in its own loop (the last column)
    assert lines[0].endswith("| peak extra MiB | copy GB/s |")
    assert all(float(line.split("|")[-2]) > 0 for line in lines[2:])


@pytest.mark.parametrize("argv,message", [
    (["--optimizers", "Adma"], "unknown 'Adma' (did you mean Adam"),
    (["--params", "gpt3"], "--params: unknown 'gpt3'"),
    (["--impls", "fast"], "--impls: unknown 'fast'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--device", "tpu"], "--device: 'tpu' is not a device"),
    (["--device", "meta"], "--device: meta is not supported; cpu or cuda"),
    pytest.param(["--device", "cuda"], "this torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_state_bits_rows_measure_the_state_kept(capsys):
    """`--state-bits 32,8,4`: a row per setting for each impl, with the bytes of state per
    parameter, here worked out from the parameter shapes by the documented format (Adam's two
    moments; at 8 and 4 bits a tensor of at least 4,096 elements keeps a code per element, a
    byte or half of one, and a float32 scale per block of 256 or 128 elements, the last block
    padded; a smaller one stays float32), and the step time over the 32-bit row's (1.00 for
    that row itself).  Timings are not checked."""
    status = bench.main(["--size", "smoke", "--params", "gpt2-small", "--optimizers", "Adam",
                         "--impls", "foreach", "--state-bits", "32,8,4", "--steps", "1",
                         "--warmup", "0", "--no-torch", "--markdown"])
    assert status == 0
    lines = capsys.readouterr().out.strip().splitlines()
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert head[-2:] == ["state B/param", "x 32-bit state"]
    rows = {cells[1]: dict(zip(head, cells)) for cells in
            ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:])}
    assert list(rows) == ["torch AdamW fused", "optcraft Adam foreach 32-bit",
                          "optcraft Adam foreach 8-bit", "optcraft Adam foreach 4-bit"]
    assert rows["torch AdamW fused"]["state B/param"] == "-"
    shapes = bench.gpt2_small(16)
    numel = sum(math.prod(s) for s in shapes)

    def per_param(bits):
        total = 0
        for shape in shapes:
            n = math.prod(shape)
            if bits == 32 or n < 4096:
                total += 2 * 4 * n
            else:
                block = {8: 256, 4: 128}[bits]
                blocks = -(-n // block)
                total += 2 * (blocks * block * bits // 8 + 4 * blocks)
        return total / numel
    for bits in (32, 8, 4):
        row = rows[f"optcraft Adam foreach {bits}-bit"]
        assert row["state B/param"] == f"{per_param(bits):.2f}"
        assert float(row["x 32-bit state"]) > 0
        assert float(row["peak extra MiB"]) >= 0
    assert rows["optcraft Adam foreach 32-bit"]["x 32-bit state"] == "1.00"
    assert per_param(8) < 2.6 and per_param(4) < 1.7  # (smoke size: many small tensors)
