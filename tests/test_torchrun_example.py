"""The torchrun example of docs/integration.md (FSDP2, Muon with AdamW, a distributed checkpoint
resumed on another number of ranks), run as a user runs it: the block is written to a file and
launched with `python -m torch.distributed.run` (torchrun) on CPU processes (gloo).

tests/test_docs.py skips this block (it needs a process group); this file finds it by its first
line, `# train_muon_fsdp.py: ...`.  The expected values are the uninterrupted 2-rank run's: a run
resumed from its checkpoint, on 1, 2 or 4 ranks, must print the same losses and end with the same
weights.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import optcraft

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="this torch build has no torch.distributed with the gloo backend"),
]

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "integration.md"
NAME = "train_muon_fsdp.py"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
STEPS, SAVE_AT = 8, 4
#: float64: another number of ranks sums the gradient in another order, and in float64 that
#: never reaches Muon's bfloat16 Newton-Schulz (measured: 8e-12 relative).  See the page.
CLOSE = dict(rtol=1e-9, atol=1e-12)


def example() -> str:
    blocks = [code for code in BLOCK.findall(PAGE.read_text())
              if code.startswith(f"# {NAME}")]
    assert len(blocks) == 1, f"docs/integration.md has {len(blocks)} blocks named {NAME}"
    return blocks[0]


def torchrun(folder: Path, ranks: int, *args: str, steps: int = STEPS) -> dict:
    """The example on `ranks` processes, in `folder`: the losses rank 0 printed, by step, and the
    whole weights it saved."""
    env = dict(os.environ)
    # the optcraft under test, whether installed or on PYTHONPATH
    source = str(Path(optcraft.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    out = f"weights-{ranks}-{len(list(folder.glob('weights-*')))}.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", NAME, "--steps", str(steps), "--out", out, *args]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    losses = {int(step): float(loss) for step, loss in
              re.findall(r"^step (\d+) loss (\S+)$", done.stdout, re.M)}
    return {"losses": losses, "weights": torch.load(folder / out, weights_only=True)}


def assert_same(resumed: dict, straight: dict, **close) -> None:
    assert sorted(resumed["losses"]) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in resumed["losses"].items():
        torch.testing.assert_close(loss, straight["losses"][step], **close)
    assert resumed["weights"].keys() == straight["weights"].keys()
    for name, weight in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, **close, msg=name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrun")
    (folder / NAME).write_text(example())
    return folder


@pytest.fixture(scope="module")
def straight64(folder):
    """8 steps on 2 ranks in float64, the checkpoint saved after step 4."""
    return torchrun(folder, 2, "--dtype", "float64", "--save-at", str(SAVE_AT),
                    "--checkpoint", "checkpoint64")


@pytest.mark.parametrize("ranks", [1, 4])
def test_resumed_on_other_ranks_continues_as_uninterrupted(folder, straight64, ranks):
    resumed = torchrun(folder, ranks, "--dtype", "float64", "--resume",
                       "--checkpoint", "checkpoint64")
    assert_same(resumed, straight64, **CLOSE)


def test_the_steps_after_the_checkpoint_move_the_weights(folder, straight64):
    """Equal final weights are not just the checkpoint's loaded back: resumed for no step, the
    weights are the checkpoint's, and the 4 steps after it change every matrix."""
    loaded = torchrun(folder, 1, "--dtype", "float64", "--resume", "--checkpoint",
                      "checkpoint64", steps=SAVE_AT)
    assert loaded["losses"] == {}
    for name, weight in loaded["weights"].items():
        if weight.ndim == 2:
            assert (straight64["weights"][name] - weight).abs().max() > 1e-3, name


def test_resumed_on_the_same_ranks_float32_bit_for_bit(folder):
    straight = torchrun(folder, 2, "--save-at", str(SAVE_AT), "--checkpoint", "checkpoint32")
    resumed = torchrun(folder, 2, "--resume", "--checkpoint", "checkpoint32")
    assert straight["weights"]["embed.weight"].dtype == torch.float32
    assert_same(resumed, straight, rtol=0, atol=0)
