"""The `optcraft` command, run as a user runs it, checked by what it writes.

The main paths run in a fresh process (`python -m optcraft.cli ...`, what the console script
runs); the many small variations call `optcraft.cli.main(argv)` in this process, which is the
console script's entry point, to keep the suite fast.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from optcraft import registry

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from optcraft.cli import main  # noqa: E402
from optcraft.cli import lr_find, trajectory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = -(-1437 // 64)  # the digits' training split (80% of 1,797), batch 64


def optcraft(*args, env=None, timeout=120):
    """Run `python -m optcraft.cli ARGS` in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "optcraft.cli", *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture
def run_main(capsys):
    """`main(argv)` in this process: (exit status, stdout, stderr); torch's thread count restored."""
    threads = torch.get_num_threads()

    def call(*args):
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err

    yield call
    torch.set_num_threads(threads)


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, as an image reader sees the file."""
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


def assert_one_line_error(status, err, *fragments):
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("optcraft: error:"), lines[0]
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
    rows = read_csv(out / "compare.csv")
    assert len(rows) == 2 * 3 * STEPS_PER_EPOCH
    for name in ("Adam", "SGD"):
        mine = [r for r in rows if r["optimizer"] == name]
        assert [int(r["step"]) for r in mine] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
        assert all(float(r["train_loss"]) > 0 and float(r["step_time_ms"]) > 0 for r in mine)
        # Validation numbers on the last step of each epoch, the last one the table's.
        evaluated = [r for r in mine if r["val_accuracy"]]
        assert [int(r["step"]) for r in evaluated] == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
        table = table_rows(result.stdout)[name]
        assert float(evaluated[-1]["val_accuracy"]) == pytest.approx(float(table[2]), abs=5e-4)
        last_epoch = [float(r["train_loss"]) for r in mine[-STEPS_PER_EPOCH:]]
        assert sum(last_epoch) / len(last_epoch) == pytest.approx(float(table[1]), abs=5e-4)


def test_compare_png_has_the_expected_size(compare_run):
    _, out = compare_run
    assert png_size(out / "compare.png") == (1200, 450)


def test_compare_same_start_same_numbers(run_main, tmp_path):
    """Same seed: the same initial weights and batches, so a rerun gives the same losses, and two
    optimizers see the same first loss; another seed does not."""
    losses = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        status, _, err = run_main("compare", "--optimizers", "SGD,Lamb", "--epochs", "1",
                                  "--seed", seed, "--out", tmp_path / name)
        assert status == 0, err
        losses[name] = read_csv(tmp_path / name / "compare.csv")
    first = {r["optimizer"]: r["train_loss"] for r in losses["a"] if r["step"] == "1"}
    assert first["SGD"] == first["Lamb"]
    assert [r["train_loss"] for r in losses["a"]] == [r["train_loss"] for r in losses["b"]]
    assert [r["train_loss"] for r in losses["a"]] != [r["train_loss"] for r in losses["c"]]


def test_compare_lr_and_impl_options(run_main, tmp_path):
    status, out, err = run_main("compare", "--optimizers", "adam,ranger", "--lr",
                                "Adam=1e-3,RANGER=0.02", "--epochs", "1", "--impl", "reference",
                                "--out", tmp_path)
    assert status == 0, err
    rows = table_rows(out)
    assert rows["Adam"][0] == "0.001" and rows["ranger"][0] == "0.02"
    assert {r["lr"] for r in read_csv(tmp_path / "compare.csv")} == {"0.001", "0.02"}


# ---- lr-find -------------------------------------------------------------------------------------

def test_lr_find_plot_csv_and_suggestions(tmp_path):
    result = optcraft("lr-find", "Adam", "--end-lr", "1000", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "lr-find-Adam.png") == (800, 500)
    rows = read_csv(tmp_path / "lr-find-Adam.csv")
    lrs = [float(r["lr"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    smoothed = [float(r["smoothed_loss"]) for r in rows]
    # The sweep: geometric from 1e-7 towards 1000 in 100 steps.
    assert lrs[0] == pytest.approx(1e-7)
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(1e-7 * 1e10 ** (i / 100), rel=1e-4)
    # The smoothing: a debiased exponential moving average of the raw losses, beta 0.98.
    average = 0.0
    for i, (loss, value) in enumerate(zip(losses, smoothed), 1):
        average = 0.98 * average + 0.02 * loss
        assert value == pytest.approx(average / (1 - 0.98 ** i), rel=1e-4)
    # Adam diverges before lr 1000: the sweep stops at the first smoothed loss above 4x the minimum.
    assert len(rows) < 100
    assert smoothed[-1] > 4 * min(smoothed) * (1 - 1e-4)
    assert all(s <= 4 * min(smoothed[: i + 1]) for i, s in enumerate(smoothed[:-1]))
    line = next(l for l in result.stdout.splitlines() if l.startswith("suggested lr:"))
    suggested = dict(part.split() for part in line.split(":", 1)[1].split(","))
    assert set(suggested) == {"valley", "steep"}
    for value in suggested.values():
        assert 1e-5 < float(value) < 1.0


def test_lr_find_suggestions_follow_fastai_definitions():
    lrs = [10.0 ** (i - 6) for i in range(8)]
    losses = [3.0, 2.9, 2.0, 1.9, 1.8, 1.7, 1.6, 3.0]
    # Steepest: the largest drop per decade is 2.9 -> 2.0, starting at index 1.
    assert lr_find.steep(lrs, losses) == (lrs[1], 2.9)
    # Valley: the longest decreasing run is indices 0-6 (7 points); fastai's arithmetic puts the
    # suggestion at -1 + int(7/3) + int(7/6) = 2.
    assert lr_find.valley(lrs, losses) == (lrs[2], 2.0)
    # A longer valley found later wins over an earlier, shorter one.
    # Here: 5 > 4 > 3 > 2.5 > 2.4 > 0.5 ends at 7 with 6 points, so start = 1 and the
    # suggestion is at 1 + int(6/3) + int(6/6) = 4.
    losses = [2.0, 1.0, 5.0, 4.0, 3.0, 2.5, 2.4, 0.5]
    assert lr_find.valley(lrs, losses) == (lrs[4], 3.0)


def test_lr_find_bad_input(run_main, tmp_path):
    assert_one_line_error(*run_main("lr-find", "Adma", "--out", tmp_path)[::2], "Adam")
    assert_one_line_error(*run_main("lr-find", "Adam", "--start-lr", "1", "--end-lr", "0.1",
                                    "--out", tmp_path)[::2], "--end-lr")
    assert_one_line_error(*run_main("lr-find", "Adam", "--start-lr", "-1",
                                    "--out", tmp_path)[::2], "--start-lr", "positive")


# ---- trajectory ----------------------------------------------------------------------------------

def test_trajectory_png_and_paths(tmp_path):
    result = optcraft("trajectory", "--function", "rosenbrock", "--optimizers", "Adam,SGD",
                      "--steps", "60", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "trajectory-rosenbrock.png") == (700, 600)
    rows = read_csv(tmp_path / "trajectory-rosenbrock.csv")
    for name in ("Adam", "SGD"):
        mine = [r for r in rows if r["optimizer"] == name]
        assert [int(r["step"]) for r in mine] == list(range(61))
        assert (float(mine[0]["x"]), float(mine[0]["y"])) == (-1.5, 2.0)
        # Every optimizer goes downhill from the start (12.5) with its chosen learning rate.
        assert float(mine[-1]["value"]) < 12.5 / 2
        assert float(mine[0]["lr"]) in [float(f"{lr:.3g}") for lr in trajectory.LR_GRID]


def test_trajectory_given_lr_two_functions(run_main, tmp_path):
    status, out, err = run_main("trajectory", "--function", "saddle,beale", "--optimizers",
                                "SGD", "--lr", "0.01", "--steps", "30", "--out", tmp_path)
    assert status == 0, err
    assert png_size(tmp_path / "trajectory-saddle-beale.png") == (1200, 550)
    rows = read_csv(tmp_path / "trajectory-saddle-beale.csv")
    saddle = [r for r in rows if r["function"] == "saddle"]
    # The commands' SGD has momentum 0.9 (grad_avg <- 0.9 grad_avg + g, p <- p - lr grad_avg);
    # on x^2 - y^2 + y^4/4 the x coordinate sees g = 2x.
    x, velocity = -1.8, 0.0
    for _ in range(30):
        velocity = 0.9 * velocity + 2 * x
        x -= 0.01 * velocity
    assert float(saddle[-1]["x"]) == pytest.approx(x, rel=1e-4)
    assert {r["lr"] for r in rows} == {"0.01"}


def test_trajectory_gradients_match_autograd():
    generator = torch.Generator().manual_seed(0)
    for function in trajectory.FUNCTIONS.values():
        x0, x1, y0, y1 = function.box
        for _ in range(5):
            u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            point = torch.tensor([x0 + u * (x1 - x0), y0 + v * (y1 - y0)], dtype=torch.float64,
                                 requires_grad=True)
            x, y = point
            cos = torch.cos
            value = {"rosenbrock": lambda: (1 - x) ** 2 + 100 * (y - x ** 2) ** 2,
                     "rastrigin": lambda: 20 + x ** 2 - 10 * cos(2 * math.pi * x) + y ** 2
                     - 10 * cos(2 * math.pi * y),
                     "beale": lambda: (1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2
                     + (2.625 - x + x * y ** 3) ** 2,
                     "saddle": lambda: x ** 2 - y ** 2 + y ** 4 / 4}[function.name]()
            value.backward()
            assert function.value(*point.tolist()) == pytest.approx(value.item(), rel=1e-12)
            assert function.gradient(*point.tolist()) == pytest.approx(point.grad.tolist(),
                                                                       rel=1e-9, abs=1e-9)
        for mx, my in function.minima:
            assert function.value(mx, my) == pytest.approx(function.minimum, abs=1e-12)
            assert function.gradient(mx, my) == pytest.approx((0, 0), abs=1e-12)


def test_trajectory_bad_input(run_main, tmp_path):
    assert_one_line_error(*run_main("trajectory", "--function", "rosenbrok",
                                    "--out", tmp_path)[::2], "unknown function", "rosenbrock")
    assert_one_line_error(*run_main("trajectory", "--optimizers", "Adam", "--lr", "Adam=-0.1",
                                    "--out", tmp_path)[::2], "Adam", "lr")


# ---- list and show -------------------------------------------------------------------------------

def test_list_shows_every_optimizer_with_chain_state_and_paper(run_main):
    status, out, err = run_main("list")
    assert status == 0, err
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["name"].split()[1:9] == ["32-bit", "state", "16-bit", "state", "8-bit", "state",
                                          "4-bit", "state"]
    for entry in registry.entries():
        line = lines[entry.name]
        assert f" {entry.state_bytes:.3g} B " in line
        # the bytes at state_bits 32, 16, 8, 4, in that order (tests/test_memory.py checks them
        # against the tensors an optimizer keeps)
        assert line.split()[1:9] == [x for bits in (32, 16, 8, 4)
                                     for x in (f"{entry.state_bytes_at(bits):.3g}", "B")]
        assert entry.chain[-1] in line
        assert entry.paper in line
    # float32 state: Adam's two moments, and ranger's (RAdam's two and Lookahead's slow weights)
    assert "adam_step" in lines["Adam"] and " 8 B " in lines["Adam"]
    assert "Lookahead" in lines["ranger"] and " 12 B " in lines["ranger"]
    # 8 bits: a byte of code a moment and a float32 scale per 256 elements; Lookahead's slow
    # weights stay float32
    assert lines["Adam"].split()[1:9] == ["8", "B", "4", "B", "2.03", "B", "1.06", "B"]
    assert lines["ranger"].split()[5:7] == ["6.03", "B"]


def test_show_one_optimizer(run_main):
    status, out, err = run_main("show", "adam")
    assert status == 0, err
    assert out.startswith("Adam: ")
    assert "weight_decay > average_grad(dampening=True) > average_sqr_grad > step_stat > " \
           "adam_step" in out
    assert "8 B, 2x parameter-sized (grad_avg, sqr_avg); 16-bit 4 B, 8-bit 2.03 B, 4-bit 1.06 B" \
        in out
    assert "arXiv:1412.6980" in out
    assert "mom=0.9, sqr_mom=0.99, eps=1e-05, wd=0.01" in out


# ---- the registry --------------------------------------------------------------------------------

def test_registry_reads_chains_and_state_from_the_recipes():
    from optcraft.optimizers import classic

    for entry in registry.entries():
        opt = entry.make([torch.nn.Parameter(torch.zeros(3, 2))])
        inner = getattr(opt, "opt", opt)
        assert entry.chain == [registry.callback_name(cb) for cb in inner.cbs]
    memory = {e.name: e.state_memory for e in registry.entries()}
    assert {k: memory[k] for k in ("SGD", "RMSProp", "Adam", "RAdam", "QHAdam", "Larc", "Lamb",
                                   "ranger")} == \
        {"SGD": 1, "RMSProp": 1, "Adam": 2, "RAdam": 2, "QHAdam": 2, "Larc": 1, "Lamb": 2,
         "ranger": 3}
    assert registry.get("ranger").wrapper == "Lookahead(k=6, alpha=0.5)"
    assert registry.get("Adam").factory is classic.Adam
    assert registry.default_compare()[:7] == ["SGD", "Adam", "RAdam", "QHAdam", "Larc", "Lamb",
                                              "ranger"]


@pytest.fixture
def fake_research(monkeypatch):
    """A research module with two recipes, a helper outside __all__ and a non-recipe in it."""
    from optcraft.optimizers import classic
    from optcraft.hypers import torch_names

    module = types.ModuleType("optcraft_fake_research")

    @torch_names
    def SAdam(params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.0, impl="auto",
              master_weights=True):
        """SAdam (Tong et al., 2019, arXiv:1908.00700): calibrated Adam."""
        return classic.RAdam(params, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, beta=50.0,
                             impl=impl, master_weights=master_weights)

    @torch_names
    def StableAdam(params, lr, impl="auto", master_weights=True):
        """A stable Adam."""
        return classic.Adam(params, lr=lr, impl=impl, master_weights=master_weights)

    @torch_names
    def NewAdam(params, lr, impl="auto", master_weights=True):
        """An Adam from a researcher's notebook."""
        return classic.Adam(params, lr=lr, impl=impl, master_weights=master_weights)

    def helper(p):
        return p

    module.SAdam, module.StableAdam, module.NewAdam = SAdam, StableAdam, NewAdam
    module.helper, module.CONSTANT, module.hidden_recipe = helper, 1, SAdam
    module.__all__ = ["SAdam", "StableAdam", "NewAdam", "helper", "CONSTANT"]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "OPTIONAL_MODULES", (module.__name__,))
    registry._all.cache_clear()
    yield module
    registry._all.cache_clear()


def test_registry_includes_research_recipes_when_present(fake_research):
    assert registry.names()[-3:] == ["SAdam", "StableAdam", "NewAdam"]
    entry = registry.get("sadam")
    assert entry.paper == "Tong et al., 2019, arXiv:1908.00700"
    assert entry.state_memory == 2 and entry.chain[-1] == "radam_step"
    assert entry.lr_tuned
    new = registry.get("NewAdam")
    assert (new.lr, new.lr_tuned) == (registry.get("Adam").lr, False)
    assert new.paper == "unpublished: a researcher's notebook"
    assert registry.default_compare()[-2:] == ["SAdam", "StableAdam"]
    assert len(registry.default_compare()) == 9


def test_registry_without_research_module(monkeypatch):
    monkeypatch.setattr(registry, "OPTIONAL_MODULES", ("optcraft.optimizers.no_such_module",))
    registry._all.cache_clear()
    try:
        assert registry.names() == ["SGD", "RMSProp", "Adam", "RAdam", "QHAdam", "Larc", "Lamb",
                                    "ranger"]
        assert "SAdam" not in registry.default_compare()
    finally:
        registry._all.cache_clear()


def test_registry_does_not_hide_a_broken_research_module(monkeypatch, tmp_path):
    (tmp_path / "optcraft_broken_research.py").write_text("import a_module_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "OPTIONAL_MODULES", ("optcraft_broken_research",))
    registry._all.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="a_module_that_is_missing"):
            registry.names()
    finally:
        registry._all.cache_clear()


# ---- bench ---------------------------------------------------------------------------------------

def test_bench_passes_its_arguments_on(run_main, monkeypatch):
    seen = []
    fake = types.ModuleType("optcraft.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "optcraft.bench", fake)
    assert run_main("bench", "--size", "smoke", "--help-me")[0] == 0
    assert seen == [["--size", "smoke", "--help-me"]]


def test_bench_missing_is_a_clear_error(run_main, monkeypatch):
    monkeypatch.setitem(sys.modules, "optcraft.bench", None)
    assert_one_line_error(*run_main("bench")[::2], "optcraft.bench")


# ---- errors --------------------------------------------------------------------------------------

def test_unknown_optimizer_names_close_matches(tmp_path):
    result = optcraft("compare", "--optimizers", "Adma,SGD", "--out", tmp_path)
    assert_one_line_error(result.returncode, result.stderr, "unknown optimizer 'Adma'", "Adam")
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_bad_hyperparameter_values(run_main, tmp_path):
    status, _, err = run_main("compare", "--optimizers", "Adam", "--lr", "Adam=-1",
                              "--out", tmp_path)
    assert_one_line_error(status, err, "Adam", "lr", "-1")
    assert not (tmp_path / "compare.csv").exists()
    assert_one_line_error(*run_main("compare", "--lr", "Adam=fast", "--out", tmp_path)[::2],
                          "not a number")
    assert_one_line_error(*run_main("compare", "--optimizers", "SGD", "--lr", "Adam=0.1",
                                    "--out", tmp_path)[::2], "not among")
    assert_one_line_error(*run_main("compare", "--optimizers", "Lamb", "--impl", "fused",
                                    "--out", tmp_path)[::2], "Lamb", "fused")
    assert_one_line_error(*run_main("compare", "--epochs", "0", "--out", tmp_path)[::2],
                          "--epochs")
    assert_one_line_error(*run_main("show", "lamm")[::2], "unknown optimizer", "Lamb")


def test_unwritable_output_folder(run_main, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status, _, err = run_main("compare", "--optimizers", "SGD", "--epochs", "1",
                              "--out", blocker / "out")
    assert_one_line_error(status, err, "cannot write to output folder", "a-file")


def test_missing_optional_dependency_names_the_extra(tmp_path):
    # A matplotlib that cannot be imported, ahead of the real one on the path.
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    result = optcraft("compare", "--optimizers", "SGD", "--epochs", "1", "--out",
                      tmp_path / "out", env=env)
    assert_one_line_error(result.returncode, result.stderr, "matplotlib",
                          "pip install 'optcraft[cli]'")
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(run_main):
    with pytest.raises(SystemExit) as exit_info:
        run_main("frobnicate")
    assert exit_info.value.code == 2
