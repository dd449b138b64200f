"""The `optcraft` command, run as a user runs it (a subprocess), checked by what it writes."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optcraft import registry

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]


def optcraft(*args, env=None, cwd=None, timeout=120):
    """Run `python -m optcraft.cli ARGS` in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "optcraft.cli", *map(str, args)],
                          capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, as an image reader sees the file."""
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The rows of the table `compare` prints, by optimizer name."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("wrote"):
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("optcraft: error:"), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- compare -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = optcraft("compare", "--optimizers", "Adam,SGD", "--epochs", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    return result, out


def test_compare_prints_a_table_with_accuracy_well_above_chance(compare_run):
    result, _ = compare_run
    rows = table_rows(result.stdout)
    assert list(rows) == ["Adam", "SGD"]
    lr, train_loss, accuracy, step_ms = rows["Adam"]
    assert float(lr) == registry.get("Adam").lr
    # 10 classes: chance is 0.1; three epochs of Adam on the digits give > 0.9.
    assert float(accuracy) > 0.9
    assert float(train_loss) < 0.5
    assert 0 < float(step_ms) < 1000
    assert float(rows["SGD"][2]) > 0.8


def test_compare_csv_has_one_row_per_step_and_optimizer(compare_run):
    result, out = compare_run
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps_per_epoch = -(-1437 // 64)  # the digits' training split, batch 64
    for name in ("Adam", "SGD"):
        mine = [r for r in rows if r["optimizer"] == name]
        assert [int(r["step"]) for r in mine] == list(range(1, 3 * steps_per_epoch + 1))
        assert all(float(r["train_loss"]) > 0 and float(r["step_time_ms"]) > 0 for r in mine)
        # Validation numbers on the last step of each epoch, the last one the table's.
        evaluated = [r for r in mine if r["val_accuracy"]]
        assert [int(r["step"]) for r in evaluated] == [steps_per_epoch * e for e in (1, 2, 3)]
        table_accuracy = float(table_rows(result.stdout)[name][2])
        assert float(evaluated[-1]["val_accuracy"]) == pytest.approx(table_accuracy, abs=5e-4)
    assert len(rows) == 2 * 3 * steps_per_epoch


def test_compare_png_has_the_expected_size(compare_run):
    _, out = compare_run
    assert png_size(out / "compare.png") == (1200, 450)


def test_compare_same_start_same_numbers(tmp_path):
    """Same seed, same initial weights and batches: a rerun gives the same losses; another seed
    does not."""
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = optcraft("compare", "--optimizers", "SGD", "--epochs", "1", "--seed", seed,
                          "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
        with open(tmp_path / name / "compare.csv") as f:
            runs[name] = [r["train_loss"] for r in csv.DictReader(f)]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_compare_lr_option_and_impl(tmp_path):
    result = optcraft("compare", "--optimizers", "adam", "--lr", "Adam=1e-3", "--epochs", "1",
                      "--impl", "reference", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout)["Adam"][0] == "0.001"
    with open(tmp_path / "compare.csv") as f:
        assert {r["lr"] for r in csv.DictReader(f)} == {"0.001"}


# ---- list and show -------------------------------------------------------------------------------

def test_list_shows_every_optimizer_with_chain_state_and_paper():
    result = optcraft("list")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for entry in registry.entries():
        line = lines[entry.name]
        assert f"{entry.state_memory}x" in line
        assert entry.chain[-1] in line
    assert "adam_step" in lines["Adam"] and "2x" in lines["Adam"]
    assert "Lookahead" in lines["ranger"] and "3x" in lines["ranger"]
    assert "1x" in lines["SGD"]


def test_show_one_optimizer():
    result = optcraft("show", "adam")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Adam: ")
    assert "average_grad(dampening=True) > average_sqr_grad > step_stat > adam_step" in out
    assert "2x (grad_avg, sqr_avg)" in out
    assert "arXiv:1412.6980" in out
    assert "sqr_mom=0.99" in out and "eps=1e-05" in out


# ---- errors --------------------------------------------------------------------------------------

def test_unknown_optimizer_names_close_matches(tmp_path):
    assert_one_line_error(optcraft("compare", "--optimizers", "Adma,SGD", "--out", tmp_path),
                          "unknown optimizer 'Adma'", "Adam")
    assert_one_line_error(optcraft("show", "lamm"), "unknown optimizer", "Lamb")


def test_bad_hyperparameter_value_is_one_line(tmp_path):
    result = optcraft("compare", "--optimizers", "Adam", "--lr", "Adam=-1", "--out", tmp_path)
    assert_one_line_error(result, "Adam", "lr", "-1")
    assert not (tmp_path / "compare.csv").exists()
    assert_one_line_error(optcraft("compare", "--lr", "Adam=fast", "--out", tmp_path),
                          "not a number")
    assert_one_line_error(optcraft("compare", "--optimizers", "Lamb", "--impl", "fused",
                                   "--out", tmp_path), "Lamb", "fused")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = optcraft("compare", "--optimizers", "SGD", "--epochs", "1", "--out", blocker / "out")
    assert_one_line_error(result, "cannot write to output folder", "a-file")


def test_missing_optional_dependency_names_the_extra(tmp_path):
    # A matplotlib that cannot be imported, ahead of the real one on the path.
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    result = optcraft("compare", "--optimizers", "SGD", "--epochs", "1", "--out",
                      tmp_path / "out", env=env)
    assert_one_line_error(result, "matplotlib", "pip install 'optcraft[cli]'")
    # `list` needs none of the extras.
    assert optcraft("list", env=env).returncode == 0


def test_usage_errors_exit_2():
    result = optcraft("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_console_script_entry_point_is_main():
    from optcraft.cli import main

    assert main(["show", "SGD"]) == 0
    assert main(["show", "nope"]) == 1
