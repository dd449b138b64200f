"""Every Python example in README.md and docs/*.md runs (so the docs cannot drift from the code).

Each ```python block runs in a fresh namespace, alone, as a reader would paste it after
`import torch` (or after what the page says it assumes, `<!-- examples run after: CODE -->`); a
page that says `<!-- examples run in order -->` has its blocks run one after the other in one
namespace.  An example that needs an optional package that is not installed
(fastai, lightning, transformers, ...) is skipped, found by the ImportError it raises, not by a
list; one that must be launched by torchrun (it reads the `RANK`/`WORLD_SIZE` torchrun sets) is
skipped with that reason.  New pages (docs/modern-*.md) are picked up as they appear.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IN_ORDER = "<!-- examples run in order -->"
AFTER = re.compile(r"<!-- examples run after: (.*?) -->")
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def _examples():
    for page in PAGES:
        text = page.read_text()
        blocks = [m.group(1) for m in BLOCK.finditer(text)]
        line_of = [text[:m.start()].count("\n") + 1 for m in BLOCK.finditer(text)]
        if IN_ORDER in text:
            if blocks:
                yield pytest.param(page, blocks, line_of, id=f"{page.name}(in order)")
            continue
        for code, line in zip(blocks, line_of):
            # a cold torch.compile costs tens of seconds on a small CPU: with the slow tests
            marks = [pytest.mark.slow] if "torch.compile" in code else []
            yield pytest.param(page, [code], [line], id=f"{page.name}:{line}", marks=marks)


def _needs_torchrun(code: str) -> bool:
    """An example of torch.distributed (DDP, ZeRO, FSDP2, distributed checkpoints): it runs in
    processes torchrun launches, with a process group; tests/test_distributed.py runs its code."""
    return "RANK" not in os.environ and any(
        word in code for word in ("torchrun", "init_process_group", "torch.distributed",
                                  "DDP(", "fully_shard"))


@pytest.mark.parametrize("page,blocks,lines", list(_examples()))
def test_example_runs(page, blocks, lines, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": "__docs_example__"}
    found = AFTER.search(page.read_text())
    exec(found.group(1) if found else "import torch", namespace)
    for code, line in zip(blocks, lines):
        if _needs_torchrun(code):
            pytest.skip(f"{page.name}:{line} is launched by torchrun (a process group)")
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except ImportError as error:
            if error.name and error.name.split(".")[0] in ("optcraft", "torch"):
                raise
            pytest.skip(f"{page.name}:{line} needs {error.name or error}, not installed")


def test_every_page_is_found():
    assert ROOT / "docs" / "integration.md" in PAGES and ROOT / "README.md" in PAGES
