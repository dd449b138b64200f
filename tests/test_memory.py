"""Issue 19: 8-bit and 4-bit (and bfloat16) optimizer state for any chain, and bfloat16 training
without a master copy (stochastic rounding).  See optcraft/state_codecs.py and docs/memory.md."""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
import torch

import optcraft as oc
from optcraft import registry, state_codecs as sc
from optcraft.engine import foreach

DOCS = Path(__file__).resolve().parents[1] / "docs" / "memory.md"


# ---- the quantiser against a reference written here ------------------------------------------

def reference_map(bits: int, signed: bool) -> list[float]:
    """The code map as docs/memory.md states it, written out independently."""
    m = bits - 1 if signed else bits
    mags = []
    for e in range(m):
        for j in range(1, 2 ** e + 1):
            mags.append(10.0 ** (e - m + 1) * (0.1 + 0.9 * j / 2 ** e))
    if signed:
        return sorted([0.0] + mags + [-v for v in mags])
    return sorted([10.0 ** -m] + mags)


def reference_quantize(x: torch.Tensor, bits: int, signed: bool):
    """Element by element, in float64: absmax per block, the nearest code (the lower on a tie),
    packed low nibble first at 4 bits."""
    size = {8: 256, 4: 128}[bits]
    values = torch.tensor(reference_map(bits, signed), dtype=torch.float64)
    flat = x.reshape(-1).float()
    n_blocks = math.ceil(flat.numel() / size)
    padded = torch.zeros(n_blocks * size)
    padded[:flat.numel()] = flat
    blocks = padded.view(n_blocks, size)
    absmax = blocks.abs().amax(1)
    normed = (blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).double()
    codes = (normed.reshape(-1, 1) - values).abs().argmin(1).to(torch.uint8)
    if bits == 4:
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, absmax


def sample(signed: bool, n: int = 5000, seed: int = 0) -> torch.Tensor:
    """Values over several decades, blocks of very different scales, a block of zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-6, 1, n)[torch.randperm(n, generator=g)]
    x[256:512] = 0.0
    return x if signed else x.square()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_code_map_is_the_documented_one(bits, signed):
    values = sc.code_map(bits, signed)
    assert list(values) == pytest.approx(reference_map(bits, signed), rel=1e-12)
    assert len(values) == (2 ** bits - 1 if signed else 2 ** bits)
    assert values[-1] == 1.0 and (values[0] == -1.0 if signed else values[0] > 0)
    assert list(values) == sorted(set(values))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_matches_the_reference_and_its_error_bound(bits, signed):
    x = sample(signed)
    codes, absmax = sc.quantize(x, bits, signed)
    ref_codes, ref_absmax = reference_quantize(x, bits, signed)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    assert codes.dtype == torch.uint8 and codes.shape == (sc.encoded_length(x.numel(), bits)[0],)
    back = sc.dequantize(codes, absmax, bits, signed, tuple(x.shape))
    bound = sc.max_error(bits, signed, x, absmax)
    # half a code step of the block's scale (plus float32 rounding of the product)
    assert ((back - x).abs() <= bound * (1 + 1e-5) + 1e-30).all()
    # the largest element of each block is stored exactly; a block of zeros decodes to zeros
    blocks = x.view(-1)[:x.numel() // sc.BLOCK[bits] * sc.BLOCK[bits]].view(-1, sc.BLOCK[bits])
    top = blocks.abs().argmax(1)
    decoded = back.view(-1)[:blocks.numel()].view_as(blocks)
    assert torch.equal(decoded.gather(1, top[:, None]).abs(), blocks.gather(1, top[:, None]).abs())
    assert (back[256:512] == 0).all()
    # the documented relative bound for the top decade
    m = bits - 1 if signed else bits
    assert bound.max() <= 0.5 * 0.9 / 2 ** (m - 1) * absmax.max() * (1 + 1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_nearest_codes_without_a_search_are_the_searched_ones(bits, signed):
    """The compiled path finds codes by a table lookup on the values' bit patterns
    (`nearest_codes`), the eager quantiser by a binary search of the midpoints: the same codes
    for every value, the reference quantiser's on the sample, and on the hard cases: each
    midpoint exactly and the floats either side of it, each code's value, zeros of both signs,
    1.0, NaN, subnormals, values over 45 decades, and those no block divided by its absmax
    leaves: beyond +-1, infinities, negative values in an unsigned map."""
    values = torch.tensor(reference_map(bits, signed), dtype=torch.float64)
    mids = ((values[1:] + values[:-1]) / 2).float()
    hard = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)),
                      torch.nextafter(mids, torch.tensor(-2.0)), values.float(),
                      torch.logspace(-45, 0, 20_000),
                      torch.tensor([0.0, -0.0, 1.0, 1e-45, float("nan")])])
    hard = torch.cat([hard, -hard, torch.tensor([1.5, -1.5, math.inf, -math.inf])])
    searched = torch.searchsorted(mids, hard).clamp(0, mids.numel())
    assert torch.equal(sc.nearest_codes(hard, bits, signed).long(), searched)
    x = sample(signed)
    codes, absmax = reference_quantize(x, bits, signed)
    size = sc.BLOCK[bits]
    normed = torch.nn.functional.pad(x, (0, -x.numel() % size)).view(-1, size) / \
        absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    found = sc.nearest_codes(normed.reshape(-1), bits, signed)
    if bits == 4:
        found = found[0::2] | (found[1::2] << 4)
    assert torch.equal(found.to(torch.uint8), codes)


def test_quantize_round_trip_is_idempotent():
    x = sample(True)
    codes, absmax = sc.quantize(x, 8, True)
    again = sc.quantize(sc.dequantize(codes, absmax, 8, True, tuple(x.shape)), 8, True)
    assert torch.equal(again[0], codes) and torch.equal(again[1], absmax)


# ---- the optimizers ----------------------------------------------------------------------------

def problem(seed=0, n_steps=30):
    """A weight (quantised at 8 and 4 bits), a bias (below the size threshold) and gradients."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(80, 64, generator=g) * 0.1
    bias = torch.randn(64, generator=g) * 0.1
    grads = [(torch.randn(80, 64, generator=g) * 1e-2, torch.randn(64, generator=g) * 1e-2)
             for _ in range(n_steps)]
    return weight, bias, grads


def run(make, n_steps=30, dtype=torch.float32, seed=0, opt=None, params=None):
    weight, bias, grads = problem(seed, n_steps)
    if params is None:
        params = [weight.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()]
    opt = opt or make(params)
    for gw, gb in grads[:n_steps]:
        params[0].grad, params[1].grad = gw.to(dtype), gb.to(dtype)
        opt.step()
    return opt, params


def test_state_is_stored_as_asked():
    for bits in (32, 16, 8, 4):
        opt, (w, b) = run(lambda ps: oc.Adam(ps, lr=1e-3, state_bits=bits), n_steps=2)
        st, small = opt.state[w], opt.state[b]
        if bits in (8, 4):
            assert st["grad_avg"].dtype == torch.uint8
            assert st["grad_avg"].numel() == 80 * 64 * bits // 8
            assert st[f"grad_avg.absmax.{bits}s"].shape == (80 * 64 // sc.BLOCK[bits],)
            assert st[f"sqr_avg.absmax.{bits}u"].dtype == torch.float32  # unsigned: declared
            assert small["grad_avg"].dtype == torch.float32  # below the threshold
            assert set(small) == {"grad_avg", "sqr_avg", "step"}
        else:
            expected = torch.bfloat16 if bits == 16 else torch.float32
            assert st["grad_avg"].dtype == small["grad_avg"].dtype == expected
        assert st["step"] == 2


@pytest.mark.parametrize("bits", [8, 4])
def test_one_step_is_float32_adam_then_quantized(bits):
    """From the same (decoded) state, a quantised step moves the parameters exactly as float32
    Adam does, and keeps exactly the codes of float32 Adam's new state."""
    opt8, (w8, b8) = run(lambda ps: oc.Adam(ps, lr=1e-3, state_bits=bits), n_steps=5)
    w32, b32 = w8.detach().clone().requires_grad_(), b8.detach().clone().requires_grad_()
    opt32 = oc.Adam([w32, b32], lr=1e-3)
    opt32.load_state_dict(opt8.state_dict())  # decoded, exactly
    g = torch.Generator().manual_seed(9)
    w8.grad = w32.grad = torch.randn(80, 64, generator=g) * 1e-2
    b8.grad = b32.grad = torch.randn(64, generator=g) * 1e-2
    opt8.step()
    opt32.step()
    assert torch.equal(w8, w32) and torch.equal(b8, b32)
    for name, signed in (("grad_avg", True), ("sqr_avg", False)):
        exact = opt32.state[w32][name]
        codes, absmax = sc.quantize(exact, bits, signed)
        key = sc.scale_key(name, bits, signed)
        assert torch.equal(opt8.state[w8][name], codes)
        assert torch.equal(opt8.state[w8][key], absmax)


def test_8bit_adam_tracks_float32_adam():
    """Over 200 steps the 8-bit trajectory stays within a bound derived from the code step: each
    step's update is off by at most lr times the relative error the codes allow in m / sqrt(v)
    (twice the largest relative half-step of the signed map, 7% at the bottom of the top
    decade); the gradients here are noise, so the errors do not add up: on average the distance
    is the size of the typical per-step relative error (0.35% to 7%) times the distance
    travelled, under 5%."""
    steps, lr = 200, 1e-3
    _, (w8, _) = run(lambda ps: oc.Adam(ps, lr=lr, state_bits=8), n_steps=steps)
    _, (w32, _) = run(lambda ps: oc.Adam(ps, lr=lr), n_steps=steps)
    start, _, _ = problem(0, 1)
    travelled = (w32 - start).abs().mean()
    gap = (w8 - w32).abs()
    # worst case: every step off by lr * 2 * rel, rel = half the top decade's relative step of
    # the signed map / its bottom (0.45 / 2**6 / 0.1 = 7%): 200 * 1e-3 * 0.14 = 0.028
    worst = steps * lr * 2 * (0.45 / 2 ** 6 / 0.1)
    assert gap.max() < worst
    assert gap.mean() < 0.05 * travelled, (gap.mean(), travelled)


@pytest.mark.parametrize("impl", ["reference", "foreach", "fused", "auto"])
def test_every_eager_path_gives_the_same_8bit_steps(impl):
    _, (w, b) = run(lambda ps: oc.Adam(ps, lr=1e-3, state_bits=8, impl=impl), n_steps=10)
    _, (w_ref, b_ref) = run(lambda ps: oc.Adam(ps, lr=1e-3, state_bits=8, impl="foreach"),
                            n_steps=10)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-6)


def unpacked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """One code per element (4-bit codes are two a byte, the even element low)."""
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(-1)
    return codes.to(torch.int32)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_path_decodes_and_encodes_in_its_graph(bits, monkeypatch):
    """impl="compiled" on a 300 x 300 weight (large enough to be compiled; 90,000 elements, no
    multiple of a block) beside a bias (run eagerly): from the second step on, the weight's
    codes go into the compiled graph as they are stored, and the graph decodes, steps and
    encodes them (the eager dequantiser is not called for it); step by step, from the same
    state, it gives foreach's numbers within float32 tolerance.

    Tolerance: the compiled chain computes the new moments in float32 with inductor's fused
    arithmetic, which may round an ulp differently from the foreach kernels; the weights then
    differ by about an ulp (torch's float32 `assert_close` tolerance), the block scales (each a
    moment's largest magnitude) by an ulp, and a code only where a moment lies within an ulp of
    a midpoint between two codes: by one code there, at a handful of the 90,000 elements."""
    pytest.importorskip("torch._inductor")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 300, generator=g).requires_grad_()
    b = torch.randn(300, generator=g).requires_grad_()
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt = oc.Adam([w, b], lr=1e-3, state_bits=bits, impl="compiled")
    ref = oc.Adam([w_ref, b_ref], lr=1e-3, state_bits=bits, impl="foreach")
    calls = []
    dequantize = sc.dequantize
    monkeypatch.setattr(sc, "dequantize", lambda codes, *a, **k: calls.append(codes.numel())
                        or dequantize(codes, *a, **k))
    for i in range(6):
        with torch.no_grad():
            w_ref.copy_(w)
            b_ref.copy_(b)
        ref.load_state_dict(opt.state_dict())  # the same state, codes as they are
        w.grad = torch.randn(300, 300, generator=g) * 1e-2
        b.grad = torch.randn(300, generator=g) * 1e-2
        w_ref.grad, b_ref.grad = w.grad.clone(), b.grad.clone()
        calls.clear()
        opt.step()
        if i >= 1:
            assert calls == [], "the compiled step decoded the weight's state eagerly"
        ref.step()
        torch.testing.assert_close(w, w_ref)
        torch.testing.assert_close(b, b_ref)
        for name, signed in (("grad_avg", True), ("sqr_avg", False)):
            ours, theirs = opt.state[w][name], ref.state[w_ref][name]
            assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
            apart = (unpacked(ours, bits) - unpacked(theirs, bits)).abs()
            assert apart.max() <= 1 and (apart > 0).sum() <= 10, (name, apart.max(), i)
            key = sc.scale_key(name, bits, signed)
            torch.testing.assert_close(opt.state[w][key], ref.state[w_ref][key])
    assert opt.path.compiles >= 1


NAMED = [n for n in registry.names()]


@pytest.mark.parametrize("name", NAMED)
def test_every_named_optimizer_takes_state_bits(name):
    entry = registry.get(name)
    for bits in (8, 4):
        opt, (w, b) = run(lambda ps: entry.make(ps, lr=1e-3, state_bits=bits), n_steps=3)
        assert torch.isfinite(w).all() and torch.isfinite(b).all()
        inner = opt
        while not hasattr(inner, "chains"):
            inner = inner.opt
        assert inner.state_bits == bits
        kept = {k for k, r in inner.chain.kept.items() if r.like_param}
        for key in kept & set(inner.state[w]):
            if isinstance(inner.state[w][key], torch.Tensor):
                assert inner.state[w][key].dtype == torch.uint8, (name, key)
        if name == "Adam":
            with pytest.raises(ValueError, match="state_bits"):
                entry.make([w], lr=1e-3, state_bits=6)


def test_state_dict_holds_codes_and_resumes_exactly(tmp_path):
    make = lambda ps: oc.Adam(ps, lr=1e-3, state_bits=4)  # noqa: E731
    opt, params = run(make, n_steps=5)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    state = loaded["state"][0]
    assert state["grad_avg"].dtype == torch.uint8 and "grad_avg.absmax.4s" in state
    copy = [p.detach().clone().requires_grad_() for p in params]
    resumed = make(copy)
    resumed.load_state_dict(loaded)
    for a, b in zip(params, copy):
        for k, v in opt.state[a].items():
            assert torch.equal(v, resumed.state[b][k]) if isinstance(v, torch.Tensor) else \
                v == resumed.state[b][k]
    weight, bias, grads = problem(1, 5)
    for gw, gb in grads:
        for ps, o in ((params, opt), (copy, resumed)):
            ps[0].grad, ps[1].grad = gw.clone(), gb.clone()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, copy))


def test_float32_checkpoint_converts_to_8bit_and_back():
    opt32, params = run(lambda ps: oc.Adam(ps, lr=1e-3), n_steps=5)
    opt8 = oc.Adam([p.detach().clone().requires_grad_() for p in params], lr=1e-3, state_bits=8)
    opt8.load_state_dict(opt32.state_dict())
    w8 = opt8.param_groups[0]["params"][0]
    for name, signed in (("grad_avg", True), ("sqr_avg", False)):
        exact = opt32.state[params[0]][name]
        codes, absmax = sc.quantize(exact, 8, signed)
        assert torch.equal(opt8.state[w8][name], codes)  # converted once, as documented
        back = sc.dequantize(codes, absmax, 8, signed, tuple(exact.shape))
        assert ((back - exact).abs() <= sc.max_error(8, signed, exact, absmax) * (1 + 1e-5)).all()
    again = oc.Adam([p.detach().clone().requires_grad_() for p in params], lr=1e-3)
    again.load_state_dict(opt8.state_dict())  # back to float32: the decoded values, exactly
    w32 = again.param_groups[0]["params"][0]
    assert again.state[w32]["grad_avg"].dtype == torch.float32
    assert torch.equal(again.state[w32]["grad_avg"], sc.dequantize(
        opt8.state[w8]["grad_avg"], opt8.state[w8]["grad_avg.absmax.8s"], 8, True, (80, 64)))
    bad = opt8.state_dict()
    bad["state"][0]["grad_avg"] = bad["state"][0]["grad_avg"][:-1]
    with pytest.raises(ValueError, match="codes"):
        again.load_state_dict(bad)


def test_only_one_bucket_is_decoded_at_a_time(monkeypatch):
    """The step never holds the whole model's state in float32: each decode is one bucket's."""
    seen = []
    original = sc.StateCodec.decode

    def spy(self, values, params, dtype, rules):
        out = original(self, values, params, dtype, rules)
        seen.append(sum(t.numel() for v in out.values() if hasattr(v, "tensors")
                        for t in v.tensors if t.dtype == torch.float32))
        return out

    monkeypatch.setattr(sc.StateCodec, "decode", spy)
    monkeypatch.setattr(foreach, "MIN_CHUNK_NUMEL", 10_000)
    params = [torch.zeros(100, 64, requires_grad=True) for _ in range(8)]
    opt = oc.Adam(params, lr=1e-3, state_bits=8)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(seen) >= 8 and max(seen) <= 2 * 6400  # two moments of one 6,400-element bucket


# ---- stochastic rounding ---------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased():
    """The mean of many rounded values equals the exact value within its standard error."""
    g = torch.Generator().manual_seed(0)
    x = 1 + torch.rand(50, generator=g) * 1e-2  # between bfloat16's codes near 1
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        draws = torch.stack([sc.stochastic_round(x, dtype).float() for _ in range(4000)])
        mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
        assert ((mean - x).abs() <= 4 * se + 1e-7).all()
        below, above = x.to(dtype).float().minimum(draws.min(0).values), draws.max(0).values
        assert ((above - below) <= 2 * (x - x.to(dtype).float()).abs().max() + 1e-2).all()


def test_bf16_without_master_sums_tiny_updates_where_nearest_stalls():
    """10,000 weights at 1.0, 300 SGD steps of 1e-4: nearest rounding never moves them (1.0's
    spacing below is 2**-8); stochastic rounding, the default without master weights, ends with
    a mean of 0.97 within its standard error."""
    n = 10_000
    torch.manual_seed(0)
    results = {}
    for rounding in ("stochastic", "nearest"):
        p = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        opt = oc.SGD([p], lr=1e-4, master_weights=False,
                     **({} if rounding == "stochastic" else {"rounding": "nearest"}))
        for _ in range(300):
            p.grad = torch.ones(n, dtype=torch.bfloat16)
            opt.step()
        results[rounding] = p.detach().float()
        assert "master_weight" not in opt.state[p]
    assert (results["nearest"] == 1.0).all()
    got = results["stochastic"]
    se = got.std() / math.sqrt(n)
    assert abs(got.mean().item() - (1 - 300 * 1e-4)) <= 4 * se.item()


def test_bf16_without_master_and_8bit_state_trains():
    torch.manual_seed(0)
    opt, (w, b) = run(lambda ps: oc.Adam(ps, lr=1e-3, master_weights=False, state_bits=8),
                      dtype=torch.bfloat16, n_steps=5)
    assert w.dtype == torch.bfloat16 and opt.state[w]["grad_avg"].dtype == torch.uint8
    assert opt.state[b]["grad_avg"].dtype == torch.bfloat16  # small: the parameter's dtype
    assert "master_weight" not in opt.state[w]
    sd = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_changing_state_bits_later_converts_at_the_next_step():
    opt, (w, b) = run(lambda ps: oc.Adam(ps, lr=1e-3, state_bits=8), n_steps=3)
    opt.state_bits = 32
    run(None, n_steps=1, opt=opt, params=[w, b])
    assert opt.state[w]["grad_avg"].dtype == torch.float32
    assert not any(".absmax." in k for k in opt.state[w])


# ---- docs ----------------------------------------------------------------------------------------

def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks(DOCS))) if DOCS.exists() else [])
def test_docs_memory_python_blocks_run_standalone(index):
    exec(compile(python_blocks(DOCS)[index], f"{DOCS.name}[{index}]", "exec"), {})


# ---- the benchmark's rows ----------------------------------------------------------------------

def test_bench_measures_state_bytes_per_parameter():
    """One 8,192-element weight: Adam keeps 2 moments: 8 bytes a parameter at 32 bits, 4 at 16,
    2 * (1 + 4/256) at 8 and 2 * (0.5 + 4/128) at 4 (codes and block scales)."""
    from optcraft import bench

    params = [torch.zeros(64, 128, requires_grad=True)]
    params[0].grad = torch.randn(64, 128)
    found = bench.make_candidates("Adam", bench.ALGORITHMS["Adam"], params, ["foreach"], False,
                                  [32, 16, 8, 4])
    assert [c.label for c in found] == ["torch AdamW fused"] + [
        f"optcraft Adam foreach {b}-bit" for b in (32, 16, 8, 4)]
    for c in found[1:]:
        c.optimizer.step()
    assert [bench.state_bytes_per_param(c.optimizer) for c in found[1:]] == \
        [8.0, 4.0, 2 * (1 + 4 / 256), 2 * (0.5 + 4 / 128)]
    rows = [dict(params="p", candidate="c", median_ms=1.0, vs_fused_adamw=1.0, vs_floor=1.0,
                 first_steps_s=1.0, peak_extra_mib=None, bandwidth_gbs=1.0, state_bytes=2.03,
                 vs_32bit=1.5)]
    assert bench.table(rows, markdown=True).splitlines()[0].endswith(
        "| state B/param | x 32-bit state |")


def test_8bit_adam_is_as_close_to_float32_as_torchaos_adamw8bit():
    """Against torchao's AdamW8bit (block-wise, 256-element blocks, dynamic maps), when torchao is
    installed (it is not a dependency; it runs on a CPU, compiling its step): over the same 50
    steps, optcraft's 8-bit Adam strays from float32 AdamW no further than 1.5 times as far as
    torchao's does."""
    ao = pytest.importorskip("torchao.optim")
    steps, lr = 50, 1e-3
    _, (w_ours, _) = run(lambda ps: oc.Adam(ps, lr=lr, wd=0.0, state_bits=8), n_steps=steps)
    _, (w32, _) = run(lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.99), eps=1e-5,
                                                    weight_decay=0.0), n_steps=steps)
    _, (w_ao, _) = run(lambda ps: ao.AdamW8bit(ps, lr=lr, betas=(0.9, 0.99), eps=1e-5,
                                               weight_decay=0.0), n_steps=steps)
    ours, theirs = (w_ours - w32).abs().mean(), (w_ao - w32).abs().mean()
    print(f"mean |8-bit - float32|: optcraft {ours:.3e}, torchao {theirs:.3e}")
    assert ours <= 1.5 * theirs


@pytest.mark.slow
def test_8bit_adam_meets_bitsandbytes_own_bounds_as_adam8bit_does():
    """Against bitsandbytes' `Adam8bit` (block-wise, 256-element blocks, its dynamic map;
    installed by the test extra: 0.50 runs its 8-bit optimizers on CPU tensors), with the bounds bitsandbytes' own test (`test_optimizer8bit`, float32) holds it to
    against float32 `torch.optim.Adam` (defaults), by the same procedure: 100 steps of gradients
    0.01 * randn on weights 0.1 * randn; after each, at most 5 weights outside
    isclose(atol=1e-5, rtol=1e-3) of float32 Adam's, fewer than 20 elements of each decoded
    moment outside isclose(atol=3e-3, rtol=1e-3), mean absolute error under 1.2e-4 and mean
    relative error under 1.2e-3; then, as there, the 8-bit run takes the float32 weights and
    the float32 run the decoded moments, so that each step is compared, not a drift.  Both
    optimizers are held to it side by side."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes import functional as bnb_functional

    torch.manual_seed(0)
    shape = (256, 512)
    start = torch.randn(shape) * 0.1
    runs = {}
    for name in ("optcraft", "bitsandbytes"):
        p, p32 = start.clone().requires_grad_(), start.clone().requires_grad_()
        opt = oc.Adam([p], lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0, state_bits=8) \
            if name == "optcraft" else bnb.optim.Adam8bit([p])
        runs[name] = (p, opt, p32, torch.optim.Adam([p32]))

    def moments(name, opt, p):
        st = opt.state[p]
        if name == "optcraft":
            return (sc.dequantize(st["grad_avg"], st["grad_avg.absmax.8s"], 8, True, shape),
                    sc.dequantize(st["sqr_avg"], st["sqr_avg.absmax.8u"], 8, False, shape))
        return tuple(bnb_functional.dequantize_blockwise(
            st[f"state{i}"], absmax=st[f"absmax{i}"], code=st[f"qmap{i}"], blocksize=256)
            for i in (1, 2))

    def outside(a, b, atol, rtol):
        return (~torch.isclose(a, b, atol=atol, rtol=rtol)).sum().item()

    for _ in range(100):
        g = torch.randn(shape) * 0.01
        for name, (p, opt, p32, ref) in runs.items():
            p.grad, p32.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
            m, v = moments(name, opt, p)
            assert outside(p32, p.detach(), 1e-5, 1e-3) <= 5, name
            assert outside(ref.state[p32]["exp_avg"], m, 3e-3, 1e-3) < 20, name
            assert outside(ref.state[p32]["exp_avg_sq"], v, 3e-3, 1e-3) < 20, name
            error = (p32 - p).abs()
            assert error.mean() < 1.2e-4 and (error / (p32.abs() + 1e-9)).mean() < 1.2e-3, name
            with torch.no_grad():
                p.copy_(p32)
            ref.state[p32]["exp_avg"].copy_(m)
            ref.state[p32]["exp_avg_sq"].copy_(v)


def test_evaluation_point_reads_the_decoded_state():
    """`opt.eval()` hands a block's `eval_point` function the state decoded (a block keeping
    a like-parameter point `z` and evaluating there)."""
    from optcraft.blocks import block, like_param

    def to_eval(p, z=None, **kwargs):
        p.copy_(z)

    def to_train(p, **kwargs):
        pass

    @block(state=dict(z=like_param), eval_point=(to_eval, to_train), reads="elements")
    def keep_point(p, z=None, **kwargs):
        if z is None:
            z = p.clone()
        z.mul_(0.5)
        return {"z": z}

    w = torch.ones(80, 64, requires_grad=True)
    w.grad = torch.ones_like(w)
    opt = oc.Optimizer([w], [keep_point], state_bits=8)
    opt.step()
    assert opt.state[w]["z"].dtype == torch.uint8
    opt.eval()
    assert torch.equal(w.detach(), torch.full((80, 64), 0.5))  # 0.5 = absmax: stored exactly


def test_quantizer_works_in_pieces_with_the_same_result(monkeypatch):
    """Quantising and dequantising go through a tensor in pieces (small temporaries); the
    pieces' boundaries change nothing, and the input is left as it was."""
    x = sample(True, n=70_001)
    kept = x.clone()
    whole = {}
    for bits in (8, 4):
        whole[bits] = sc.quantize(x, bits, True)
    monkeypatch.setattr(sc, "CHUNK_NUMEL", 1000)
    for bits in (8, 4):
        codes, absmax = sc.quantize(x, bits, True)
        assert torch.equal(codes, whole[bits][0]) and torch.equal(absmax, whole[bits][1])
        back = sc.dequantize(codes, absmax, bits, True, tuple(x.shape))
        monkeypatch.setattr(sc, "CHUNK_NUMEL", 1 << 30)
        assert torch.equal(back, sc.dequantize(codes, absmax, bits, True, tuple(x.shape)))
        monkeypatch.setattr(sc, "CHUNK_NUMEL", 1000)
    assert torch.equal(x, kept)


def test_compare_takes_state_bits():
    from optcraft.cli.common import CLIError
    from optcraft.cli.compare import parse_state_bits, run_label

    assert parse_state_bits("32, 8,4") == [32, 8, 4]
    with pytest.raises(CLIError, match="--state-bits"):
        parse_state_bits("6")
    assert run_label("Adam", 8) == "Adam 8-bit" and run_label("Adam", None, True) == "Adam bf16"


# ---- bytes of state per parameter, as `optcraft list` prints them ----------------------------

def tensor_bytes(st: dict) -> int:
    return sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", NAMED)
def test_state_bytes_from_the_specification_are_the_bytes_kept(name):
    """`Chain.state_bytes(p, state_bits=...)` (what `optcraft list` prints, per element of a
    1024 x 1024 weight) is worked out from the blocks' declarations and the codec's rules; here
    it is checked against the bytes of the tensors an optimizer really keeps after two steps, at
    each setting (entry by entry, for the entries it made; optional ones, which the total counts
    as if made, only once their switch is on), for a weight above the quantisation threshold whose size is no multiple of a
    block (4,550 elements: the last block's padding is counted) and a bias below it (kept as at
    32 bits).  What a wrapper adds (Lookahead's slow weights) is counted at 4 bytes."""
    entry = registry.get(name)
    g = torch.Generator().manual_seed(0)
    for bits in sc.STATE_BITS:
        w = (torch.randn(70, 65, generator=g) * 0.1).requires_grad_()
        b = (torch.randn(65, generator=g) * 0.1).requires_grad_()
        opt = entry.make([w, b], lr=1e-3, state_bits=bits)
        for _ in range(2):
            w.grad, b.grad = torch.randn(70, 65, generator=g), torch.randn(65, generator=g)
            opt.step()
        inner = opt
        while not hasattr(inner, "chains"):
            inner = inner.opt
        for group in inner.param_groups:
            chain = inner._chain_of(group)
            for p in group["params"]:
                held = {**inner.state[p], **opt.state[p]}
                added = [k for k, v in held.items() if isinstance(v, torch.Tensor)
                         and k not in chain.kept and sc.SCALE_TAG not in k]  # a wrapper's
                codec = sc.StateCodec(bits)
                # (an optional entry, RMSProp's momentum, is made only once its switch is on)
                present = {k: rule for k, rule in chain.kept.items()
                           if inner.state[p].get(k) is not None}
                assert chain.required_state(p) <= set(present)
                expected = sum(codec.stored_bytes(p, rule) for rule in present.values()) + \
                    4 * p.numel() * len(added)
                kept = tensor_bytes(held)
                assert kept == expected, (name, bits, tuple(p.shape), dict(inner.state[p]))
                assert kept <= chain.state_bytes(p, state_bits=bits) + 4 * p.numel() * len(added)
    if name == "Adam":
        assert [entry.state_bytes_at(b) for b in sc.STATE_BITS] == \
            [8.0, 4.0, 2 * (1 + 4 / 256), 2 * (0.5 + 4 / 128)]


@pytest.mark.parametrize("name,expected", [("RMSProp", 4.0), ("SGD", 4.0), ("Adam", 8.0),
                                           ("Prodigy", 16.0)])
def test_listed_state_bytes_are_those_kept_with_the_listed_hyperparameters(name, expected):
    """`optcraft list`'s bytes per parameter count an optional entry only when the listed
    hyperparameters make it: RMSProp (`mom=0`) keeps its squared average alone, SGD (listed
    with `mom=0.9`) its momentum; measured from the tensors kept after a step on a 1024 x 1024
    weight."""
    entry = registry.get(name)
    w = torch.zeros(1024, 1024, requires_grad=True)
    opt = entry.make([w], lr=1e-3)
    w.grad = torch.ones_like(w)
    opt.step()
    assert tensor_bytes(opt.state[w]) / w.numel() == expected == entry.state_bytes
