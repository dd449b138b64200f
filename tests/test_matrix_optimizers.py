"""Muon, Adafactor and SOAP (optcraft.optimizers.matrix) against their references.

* Muon against torch.optim.Muon (float32 and float64 parameters);
* Adafactor against torch.optim.Adafactor, and its optax flags (momentum, clipping threshold,
  parameter scale) against a per-tensor reference written here from the paper;
* SOAP against a plain per-tensor implementation of the paper's algorithm written here.

Each over 20 steps, two parameter groups with different hyperparameters and gradients missing at
some steps, on the "reference" and "foreach" paths; a checkpoint saved and loaded mid-run must give
the uninterrupted run; the compiled path in a few slow tests.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import optcraft
from optcraft.blocks.matrix import NS_COEFFICIENTS, newton_schulz
from optcraft.optimizers.matrix import SOAP, Adafactor, Muon, hidden_matrices, muon_with_adamw

IMPLS = ["reference", "foreach"]
STEPS = 20


def make(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def clones(params):
    return [p.detach().clone().requires_grad_() for p in params]


def grads_for(params, steps, seed=1, scales=None):
    """The gradients of each step: None where `(step + index) % 4 == 0`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        row = []
        for j, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            row.append(None if (i + j) % 4 == 0 else grad)
        out.append(row)
    return out


def run(opt, params, grads):
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()


def roundtrip(opt, make_opt, params):
    """`opt`'s state through torch.save / torch.load(weights_only=True) into a fresh optimizer."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_opt(params)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def assert_resumes(make_opt, shapes, dtype=torch.float64, steps=STEPS):
    """A run cut in two by a checkpoint equals the uninterrupted run."""
    params = make(shapes, dtype)
    grads = grads_for(params, steps)
    whole = clones(params)
    run(make_opt(whole), whole, grads)
    first = make_opt(params)
    run(first, params, grads[:steps // 2])
    second = roundtrip(first, make_opt, params)
    run(second, params, grads[steps // 2:])
    for p, q in zip(params, whole):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---- Muon ----------------------------------------------------------------------------------------

MUON_SHAPES = [(6, 5), (6, 5), (5, 7), (40, 8), (8, 8), (6, 5)]


def muon_groups(params):
    return [dict(params=params[:3], lr=0.02, weight_decay=0.1, nesterov=True),
            dict(params=params[3:], lr=0.05, momentum=0.9, weight_decay=0.0, nesterov=False,
                 adjust_lr_fn="match_rms_adamw", ns_steps=4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", IMPLS)
def test_muon_matches_torch(impl, dtype):
    params = make(MUON_SHAPES, dtype)
    theirs = clones(params)
    ours = Muon(muon_groups(params), impl=impl)
    torch_muon = torch.optim.Muon(muon_groups(theirs))
    bound = 0.0  # one bfloat16 rounding of one element of the update, at each step
    for row in grads_for(params, STEPS):
        for p, q, g in zip(params, theirs, row):
            p.grad = q.grad = None if g is None else g.clone()
        ours.step()
        torch_muon.step()
        bound += 0.05 * math.sqrt(40 / 8) * 2 ** -7
        for p, q in zip(params, theirs):
            st, ts = ours.state[p], torch_muon.state[q]
            if ts:  # the momentum depends on the gradients only: the same to the bit
                assert torch.equal(st["grad_avg"], ts["momentum_buffer"])
            # The orthogonalisation is torch's bfloat16 arithmetic (batched bmm/baddbmm where
            # torch runs mm/addmm): on a CPU, MKL's batched kernel rounds an element of a
            # bfloat16 product differently once in a while (about 1 matrix in 300), so
            # a parameter may differ by a bfloat16 rounding of one step; otherwise to the bit.
            torch.testing.assert_close(p, q, rtol=0, atol=bound)
    exact = sum(int((p == q).sum()) for p, q in zip(params, theirs))
    assert exact >= 0.99 * sum(p.numel() for p in params)


def test_muon_newton_schulz_is_torchs():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.Generator().manual_seed(0)
    matrices = [torch.randn(s, generator=g) for s in [(6, 5)] * 4 + [(5, 7), (40, 8), (16, 16)]]
    ours = newton_schulz(matrices, NS_COEFFICIENTS, 5, 1e-7)
    for m, o in zip(matrices, ours):
        expected = _zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7)
        assert o.dtype == torch.bfloat16 and o.shape == m.shape
        torch.testing.assert_close(o.float(), expected.float(), rtol=0, atol=2 ** -7)
        assert (o == expected).float().mean() > 0.99


class CountMatmuls(TorchDispatchMode):
    OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.matmul.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_muon_batches_newton_schulz_over_same_shaped_matrices():
    """On the foreach path a bucket's same-shaped matrices share one chain of batched matmuls:
    ns_steps x 3 (bmm, baddbmm, baddbmm) per shape, however many matrices."""
    def matmuls(shapes):
        params = make(shapes, torch.float32)
        opt = Muon(params, lr=0.02, impl="foreach")
        for p in params:
            p.grad = torch.ones_like(p)
        with CountMatmuls() as counter:
            opt.step()
        return counter.count

    assert matmuls([(16, 8)]) == 5 * 3
    assert matmuls([(16, 8)] * 6) == matmuls([(16, 8)])
    assert matmuls([(16, 8)] * 6 + [(8, 12)] * 2) == 2 * 5 * 3


def test_muon_conv_weights_flattened_and_vectors_refused():
    conv = make([(4, 3, 3, 3)], torch.float64)
    theirs = [conv[0].detach().reshape(4, -1).clone().requires_grad_()]
    opt, ref = Muon(conv, lr=0.02, flatten=True), torch.optim.Muon(theirs, lr=0.02)
    for row in grads_for(conv, 6, scales=None):
        if row[0] is None:
            continue
        conv[0].grad, theirs[0].grad = row[0].clone(), row[0].reshape(4, -1).clone()
        opt.step(), ref.step()
    torch.testing.assert_close(conv[0].reshape(4, -1), theirs[0], rtol=0, atol=0)
    vector = make([(5,)], torch.float32)
    opt = Muon(vector, lr=0.02)  # built (the registry probes recipes on vectors) ...
    vector[0].grad = torch.ones(5)
    with pytest.raises(ValueError, match="matrices"):
        opt.step()  # ... refused at the step
    with pytest.raises(ValueError, match="flatten=True"):
        p = make([(2, 3, 4)], torch.float32)
        p[0].grad = torch.ones(2, 3, 4)
        Muon(p, lr=0.02).step()


@pytest.mark.parametrize("impl", IMPLS)
def test_muon_checkpoint_resumes(impl):
    assert_resumes(lambda ps: Muon(muon_groups(ps), impl=impl), MUON_SHAPES)


# ---- muon_with_adamw -----------------------------------------------------------------------------

class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(),
                                          torch.nn.Linear(8, 8, bias=False))
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 11)

    def forward(self, tokens):
        x = self.blocks(self.embed(tokens))
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(self.norm(x))


def test_muon_with_adamw_routes_hidden_matrices_to_muon():
    torch.manual_seed(0)
    model = TinyLM()
    opt = muon_with_adamw(model, lr=0.02, adamw_lr=1e-3, impl="foreach")
    routed = {g["chain"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    hidden = {id(model.blocks[0].weight), id(model.blocks[2].weight), id(model.conv.weight)}
    assert routed["muon"] == hidden
    assert routed["adamw"] == {id(p) for p in model.parameters()} - hidden
    assert {id(p) for p in hidden_matrices(model)} == hidden
    muon_group = next(g for g in opt.param_groups if g["chain"] == "muon")
    adam_group = next(g for g in opt.param_groups if g["chain"] == "adamw")
    assert muon_group["lr"] == 0.02 and adam_group["lr"] == 1e-3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 11, (2, 5))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p), name
    assert set(opt.state[model.conv.weight]) == {"grad_avg"}  # Muon's state
    assert set(opt.state[model.lm_head.weight]) >= {"grad_avg", "sqr_avg", "step"}  # AdamW's


def test_muon_with_adamw_runs_muon_as_muon():
    """The routed Muon part computes what Muon alone does on the same matrices."""
    torch.manual_seed(0)
    model = TinyLM()
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    opt = muon_with_adamw(model, lr=0.02)
    alone = Muon([twin.blocks[0].weight, twin.blocks[2].weight], lr=0.02)
    for step in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.full_like(p, 0.1 * (step + 1)).add_(torch.arange(p.numel()).view_as(p)
                                                               .to(p.dtype).sin())
            q.grad = p.grad.clone()
        opt.step()
        alone.step()
    torch.testing.assert_close(model.blocks[0].weight, twin.blocks[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[2].weight, twin.blocks[2].weight, rtol=0, atol=0)


def test_muon_with_adamw_takes_named_or_plain_parameters():
    named = [("embed.weight", torch.zeros(4, 3, requires_grad=True)),
             ("h.weight", torch.zeros(3, 3, requires_grad=True)),
             ("h.bias", torch.zeros(3, requires_grad=True))]
    opt = muon_with_adamw(named, lr=0.02)
    assert [(g["chain"], len(g["params"])) for g in opt.param_groups] == \
        [("muon", 1), ("adamw", 2)]
    opt = muon_with_adamw([p for _, p in named], lr=0.02)
    assert [(g["chain"], len(g["params"])) for g in opt.param_groups] == \
        [("muon", 2), ("adamw", 1)]


# ---- Adafactor -----------------------------------------------------------------------------------

ADAFACTOR_SHAPES = [(6, 5), (5,), (3, 4, 2), (), (7,), (4, 3)]


def adafactor_groups(params, torch_form=False):
    # torch's `eps=(eps1, eps2)` is `eps1` and `eps2` in a group of ours (a tuple hyperparameter
    # would read as one value per group); the recipe's `eps=` takes torch's tuple.
    eps = dict(eps=(1e-20, 1e-2)) if torch_form else dict(eps1=1e-20, eps2=1e-2)
    return [dict(params=params[:3], lr=0.02, weight_decay=0.1),
            dict(params=params[3:], lr=0.05, beta2_decay=-0.5, d=2.0, **eps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", IMPLS)
def test_adafactor_matches_torch(impl, dtype):
    params = make(ADAFACTOR_SHAPES, dtype)
    theirs = clones(params)
    ours = Adafactor(adafactor_groups(params), impl=impl)
    reference = torch.optim.Adafactor(adafactor_groups(theirs, torch_form=True))
    grads = grads_for(params, STEPS)
    run(ours, params, grads)
    run(reference, theirs, grads)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, **tol)
        st, ts = ours.state[p], reference.state[q]
        assert st["step"] == int(ts["step"])
        for name in ("row_var", "col_var", "variance"):
            if name in ts:
                torch.testing.assert_close(st[name], ts[name], **tol)
            else:
                assert st.get(name) is None, name


def adafactor_by_the_paper(params, grads, lr, mom, d, param_scale, relative_step,
                           beta2_decay=-0.8, eps1=1e-30, eps2=1e-3, wd=0.0):
    """Shazeer & Stern (2018), Algorithms 4 and 5, written per tensor with explicit row and column
    sums, with optax's options: `mom` (an average of the steps), `d` (None: no clipping),
    `param_scale`, `relative_step`."""
    state = [dict(t=0) for _ in params]
    for row in grads:
        for x, g, st in zip(params, row, state):
            if g is None:
                continue
            st["t"] += 1
            t = st["t"]
            beta2 = 1 - t ** beta2_decay
            rho = min(lr, 1 / math.sqrt(t)) if relative_step else lr
            scale = max(eps2, float(x.detach().pow(2).mean().sqrt())) if param_scale else 1.0
            alpha = rho * scale
            with torch.no_grad():
                x.mul_(1 - lr * wd)
                if g.dim() >= 2:
                    n, m = g.shape[-2], g.shape[-1]
                    r_new = (g * g).sum(-1, keepdim=True) / m
                    c_new = (g * g).sum(-2, keepdim=True) / n
                    st["R"] = beta2 * st.get("R", torch.zeros_like(r_new)) + (1 - beta2) * r_new
                    st["C"] = beta2 * st.get("C", torch.zeros_like(c_new)) + (1 - beta2) * c_new
                    v = st["R"] * st["C"] / st["R"].mean(-2, keepdim=True).clamp(min=eps1)
                else:
                    st["V"] = beta2 * st.get("V", torch.zeros_like(g)) + (1 - beta2) * g * g
                    v = st["V"]
                u = g / v.clamp(min=eps1 * eps1).sqrt()
                if d is not None:
                    u = u / max(1.0, float(u.pow(2).mean().sqrt()) / d)
                step = alpha * u
                if mom:
                    st["M"] = mom * st.get("M", torch.zeros_like(g)) + (1 - mom) * step
                    step = st["M"]
                x.sub_(step)
    return state


@pytest.mark.parametrize("flags", [
    dict(mom=0.9), dict(clipping_threshold=None, multiply_by_parameter_scale=False),
    dict(momentum=0.8, clipping_threshold=0.5, relative_step=False)])
@pytest.mark.parametrize("impl", IMPLS)
def test_adafactor_optax_flags_match_the_paper(impl, flags):
    params = make(ADAFACTOR_SHAPES, torch.float64)
    theirs = clones(params)
    opt = Adafactor(params, lr=0.02, eps=(1e-30, 1e-3), weight_decay=0.05, impl=impl, **flags)
    grads = grads_for(params, STEPS)
    run(opt, params, grads)
    mom = flags.get("mom", flags.get("momentum", 0.0))
    d = flags.get("clipping_threshold", 1.0)
    adafactor_by_the_paper(theirs, grads, lr=0.02, mom=mom, d=d,
                           param_scale=flags.get("multiply_by_parameter_scale", True),
                           relative_step=flags.get("relative_step", True), wd=0.05)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("flags", [dict(), dict(momentum=0.9)])
@pytest.mark.parametrize("impl", IMPLS)
def test_adafactor_checkpoint_resumes(impl, flags):
    assert_resumes(lambda ps: Adafactor(adafactor_groups(ps), impl=impl, **flags),
                   ADAFACTOR_SHAPES)


def test_adafactor_state_shapes_are_checked_and_counted():
    params = make([(6, 5)], torch.float32)
    opt = Adafactor(params)
    params[0].grad = torch.ones(6, 5)
    opt.step()
    assert opt.state[params[0]]["row_var"].shape == (6, 1)
    assert opt.state[params[0]]["col_var"].shape == (1, 5)
    sd = opt.state_dict()
    sd["state"][0]["row_var"] = torch.zeros(5, 1)
    with pytest.raises(ValueError, match="row means"):
        Adafactor(params).load_state_dict(sd)
    # memory: (rows + cols) / (rows * cols) of a parameter, not one parameter's size
    typical = torch.empty(1024, 1024, device="meta")
    assert opt.chain.state_bytes(typical) == 4 * (1024 + 1024)


# ---- SOAP ----------------------------------------------------------------------------------------

def mode_product(x, q, i):
    """x with its dimension i multiplied by q: `q @ unfold_i(x)`, folded back."""
    moved = x.movedim(i, 0)
    shape = moved.shape
    return (q @ moved.reshape(shape[0], -1)).reshape((q.shape[0],) + shape[1:]).movedim(0, i)


def soap_by_the_paper(params, grads, lr, betas, shampoo_beta, eps, wd, frequency, max_dim):
    """Vyas et al. (2024), Algorithm 3 (SOAP), per tensor: Adam in the eigenbasis of the
    Kronecker factors `L_i = EMA(unfold_i(G) unfold_i(G)^T)`, the basis from eigh at the first
    step (no update then), refreshed every `frequency` steps by a power iteration and QR."""
    b1, b2 = betas
    states = [dict() for _ in params]
    for row in grads:
        for x, g, st in zip(params, row, states):
            if g is None:
                continue
            dims = [i for i in range(g.dim()) if g.dim() >= 2 and g.shape[i] <= max_dim]

            def gram(i):
                u = g.movedim(i, 0).reshape(g.shape[i], -1)
                return u @ u.T

            def rotate(y, transpose):
                for i in dims:
                    y = mode_product(y, st["Q"][i].T if transpose else st["Q"][i], i)
                return y

            if not st:
                st["n"], st["M"], st["V"] = 0, torch.zeros_like(g), torch.zeros_like(g)
                st["L"] = {i: (1 - shampoo_beta) * gram(i) for i in dims}
                st["Q"] = {}
                for i in dims:
                    _, vectors = torch.linalg.eigh(st["L"][i] + 1e-30 * torch.eye(g.shape[i],
                                                                                 dtype=g.dtype))
                    st["Q"][i] = vectors.flip(-1)
                continue
            st["n"] += 1
            t = st["n"]
            st["M"] = b1 * st["M"] + (1 - b1) * g
            st["V"] = b2 * st["V"] + (1 - b2) * rotate(g, True) ** 2
            n = rotate(rotate(st["M"], True) / (st["V"].sqrt() + eps), False)
            with torch.no_grad():
                x.sub_(lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * n)
                x.mul_(1 - lr * wd)
            for i in dims:
                st["L"][i] = shampoo_beta * st["L"][i] + (1 - shampoo_beta) * gram(i)
            if t % frequency == 0:
                for i in dims:
                    q, L = st["Q"][i], st["L"][i]
                    order = torch.argsort(torch.diag(q.T @ L @ q), descending=True)
                    st["V"] = st["V"].index_select(i, order)
                    st["Q"][i], _ = torch.linalg.qr(L @ q[:, order])
    return states


SOAP_SHAPES = [(6, 5), (5,), (3, 4, 2), (4, 12), (7,), (8, 3), ()]


def soap_groups(params):
    return [dict(params=params[:4], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1),
            dict(params=params[4:], lr=0.02, shampoo_beta=0.9, eps=1e-6, weight_decay=0.0)]


@pytest.mark.parametrize("impl", IMPLS)
def test_soap_matches_the_paper(impl):
    params = make(SOAP_SHAPES, torch.float64)
    theirs = clones(params)
    opt = SOAP(soap_groups(params), precondition_frequency=3, max_precond_dim=10, impl=impl)
    grads = grads_for(params, STEPS)
    run(opt, params, grads)
    for group in soap_groups(theirs):
        hyper = dict(lr=group["lr"], betas=group.get("betas", (0.95, 0.95)),
                     shampoo_beta=group.get("shampoo_beta", 0.95), eps=group.get("eps", 1e-8),
                     wd=group["weight_decay"], frequency=3, max_dim=10)
        index = [next(i for i, q in enumerate(theirs) if q is p) for p in group["params"]]
        soap_by_the_paper(group["params"], [[row[i] for i in index] for row in grads], **hyper)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-10)
    # (4, 12): its second dimension is over max_precond_dim=10, so only the first is rotated
    st = opt.state[params[3]]
    assert st["q0"].shape == (4, 4) and st["q1"] is None and st["gg1"] is None
    assert opt.state[params[1]]["q0"] is None  # a vector: plain Adam


@pytest.mark.parametrize("impl", IMPLS)
def test_soap_checkpoint_resumes(impl):
    assert_resumes(lambda ps: SOAP(soap_groups(ps), precondition_frequency=3, max_precond_dim=10,
                                   impl=impl), SOAP_SHAPES)


# ---- the compiled path ---------------------------------------------------------------------------

COMPILED = {
    "Muon": (lambda ps, impl: Muon(ps, lr=0.02, impl=impl), [(16, 8), (16, 8), (8, 12)]),
    "Adafactor": (lambda ps, impl: Adafactor(ps, lr=0.02, momentum=0.9, impl=impl),
                  [(16, 8), (3, 4, 2), (20,)]),
    "SOAP": (lambda ps, impl: SOAP(ps, lr=0.01, precondition_frequency=2, impl=impl),
             [(16, 8), (12,), (4, 3, 5)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compiled_path_gives_the_reference_numbers(name, monkeypatch):
    """Adafactor and SOAP compile and give the reference numbers (SOAP's refresh, every
    `precondition_frequency` steps, is computed at every step in the graph, where the step count
    is a tensor, and kept where due).  Muon compiles; inductor fuses its bfloat16 operations in
    float32 (no rounding between them), so its steps differ from eager ones by bfloat16
    roundings: the distance moved agrees to a few percent."""
    monkeypatch.setattr(optcraft.compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)
    make_opt, shapes = COMPILED[name]
    params = make(shapes, torch.float64)
    start = clones(params)
    ref = clones(params)
    grads = grads_for(params, 8)
    opt = make_opt(params, "compiled")
    run(opt, params, grads)
    assert opt.path.compiles > 0 and not opt.path.untraceable
    run(make_opt(ref, "reference"), ref, grads)
    for p, q, p0 in zip(params, ref, start):
        if name == "Muon":
            assert (p - q).norm() <= 0.05 * (q - p0).norm()
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-10)


# ---- the documentation page ----------------------------------------------------------------------

def test_docs_modern_matrix_blocks_run_standalone():
    """Each Python block of docs/modern-matrix.md runs on its own, in a fresh namespace."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "modern-matrix.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 4
    for code in blocks:
        exec(compile(code, str(page), "exec"), {"__name__": "__doc_example__"})
