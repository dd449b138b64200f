"""Matrix blocks: updates that read whole matrices (Muon's orthogonalisation, Adafactor's factored
second moments, SOAP's rotation into the eigenbasis of Shampoo's factors).

Every block here declares `reads="matrix"`: it needs whole tensors, never slices.  Each keeps the
seed's names where they apply (`grad_avg` for a momentum, `sqr_avg` for a second moment, `mom`,
`sqr_mom`, `eps`, `lr`, `wd`); their own state has shape rules (`shaped`) that checkpoint
validation and memory accounting read.
"""
from __future__ import annotations

import math

import torch

from ..tensorlist import TensorList, minimum
from .base import PerParam, block, is_zero, like_param, optional, shaped, transient

# ---- Muon ----------------------------------------------------------------------------------------

#: Muon's quintic Newton-Schulz coefficients (Jordan et al., 2024), torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def muon_matrix_shape(shape: tuple, flatten: bool = False) -> tuple[int, int]:
    """The matrix Muon orthogonalises for a parameter of `shape`: the shape itself for a matrix,
    `(shape[0], prod(shape[1:]))` with `flatten=True` for a convolution's weight; ValueError for
    any other parameter (a vector, a scalar, or a tensor of 3+ dimensions without `flatten`)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return shape
    if flatten and len(shape) > 2:
        return shape[0], math.prod(shape[1:])
    raise ValueError(f"Muon orthogonalises matrices; got a parameter of shape {shape}"
                     f"{'' if len(shape) < 2 else ' (give flatten=True to reshape it to 2-D)'}: "
                     f"route vectors, embeddings and heads to AdamW (muon_with_adamw, or "
                     f"oc.route)")


def newton_schulz(matrices: list[torch.Tensor], ns_coefficients=NS_COEFFICIENTS, ns_steps=5,
                  eps=1e-7) -> list[torch.Tensor]:
    """Muon's orthogonalisation `NS(X)`, about `U V^T` for `X = U S V^T`, of each matrix, in
    bfloat16 (torch.optim.Muon's arithmetic): `X <- X / max(|X|_F, eps)`, the wide orientation
    (transposed where rows > columns), then `ns_steps` times `A = X X^T`, `B = b A + c A A`,
    `X <- a X + B X`.  Matrices of one shape run as one batch: one chain of batched matmuls per
    shape, not per matrix.  Returns bfloat16 matrices, in order."""
    if ns_steps >= 100:
        raise ValueError("ns_steps must be below 100")
    if len(ns_coefficients) != 3:
        raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}")
    a, b, c = ns_coefficients
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(matrices)
    for (rows, cols), indices in by_shape.items():
        x = torch.stack([matrices[i].bfloat16() for i in indices])
        tall = rows > cols
        if tall:
            x = x.mT
        norms = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
        x = x.div(norms.clamp(min=eps))
        for _ in range(ns_steps):
            gram = torch.bmm(x, x.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
        if tall:
            x = x.mT
        for i, m in zip(indices, x.unbind(0)):
            out[i] = m
    return out


def muon_lr_ratio(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """Muon's learning-rate scale for a `rows x cols` matrix: `sqrt(max(1, rows / cols))`
    (`adjust_lr_fn` None or "original", Keller Jordan's), `0.2 sqrt(max(rows, cols))`
    ("match_rms_adamw", Moonlight's: the update's RMS matches AdamW's)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got "
                     f"{adjust_lr_fn!r}")


@block(hypers=dict(nesterov=True, ns_coefficients=NS_COEFFICIENTS, ns_steps=5, eps=1e-7,
                   adjust_lr_fn=None),
       static=("nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn"), reads="matrix")
def muon_step(p, lr, mom, grad_avg, nesterov, ns_coefficients, ns_steps, eps, adjust_lr_fn,
              flatten=False, **kwargs):
    """Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks";
    torch.optim.Muon): with `grad_avg` the momentum `grad_avg <- mom grad_avg + (1 - mom) g`,
    `u = g + mom (grad_avg - g)` (`nesterov=True`) or `u = grad_avg`, then
    `p <- p - lr * s * NS(u)`, `NS` the Newton-Schulz orthogonalisation (`newton_schulz`, in
    bfloat16, batched over same-shaped matrices) and `s = muon_lr_ratio(rows, cols)`.

    Defaults are torch's: `ns_coefficients=(3.4445, -4.7750, 2.0315)`, `ns_steps=5`,
    `eps=1e-7`, `nesterov=True`, `adjust_lr_fn=None`.  Matrices only; with `flatten=True` a
    tensor of 3+ dimensions (a convolution's weight) runs as `(shape[0], -1)`.
    """
    shapes = [muon_matrix_shape(t.shape, flatten) for t in p.tensors]
    update = p.grad.lerp(grad_avg, mom) if nesterov else grad_avg
    ortho = newton_schulz([u.reshape(s) for u, s in zip(update.tensors, shapes)],
                          ns_coefficients, ns_steps, eps)
    by_ratio: dict[float, tuple[list, list]] = {}
    for t, o, (rows, cols) in zip(p.tensors, ortho, shapes):
        ps, os = by_ratio.setdefault(muon_lr_ratio(rows, cols, adjust_lr_fn), ([], []))
        ps.append(t)
        # in the parameter's dtype before it is scaled: torch's `add_(update, alpha=-lr)` adds
        # the bfloat16 update in float32, and so does a tensor lr's multiplication then
        os.append(o.view(t.shape).to(t.dtype))
    for ratio, (ps, os) in by_ratio.items():
        TensorList(ps).add_(TensorList(os), alpha=-(lr * ratio))


# ---- Adafactor -----------------------------------------------------------------------------------

def _rows(shape):
    return tuple(shape[:-1]) + (1,) if len(shape) >= 2 else None


def _cols(shape):
    return tuple(shape[:-2]) + (1, shape[-1]) if len(shape) >= 2 else None


def _full(shape):
    return tuple(shape) if len(shape) < 2 else None


#: Adafactor's state: factored row and column means of g^2 for tensors of 2+ dimensions
#: (torch.optim.Adafactor's shapes: `(..., rows, 1)` and `(..., 1, cols)`), the full average for
#: vectors and scalars.  Each is None for the parameters it is not kept for.
ADAFACTOR_STATE = dict(
    row_var=optional(shaped(_rows, "row means of g^2 (..., rows, 1)")),
    col_var=optional(shaped(_cols, "column means of g^2 (..., 1, cols)")),
    variance=optional(shaped(_full, "mean of g^2 (vectors)")),
)


def _per_param(values: list):
    """What a block returns for state kept for some tensors of a bucket only."""
    if all(v is not None for v in values):
        return TensorList(values)
    return PerParam(values)


@block(hypers=dict(eps2=1e-3), state=dict(param_scale=transient), reads="tensor")
def adafactor_param_scale(p, eps2, **kwargs):
    """Adafactor's parameter scale (Shazeer & Stern, 2018, arXiv:1804.04235, Algorithm 4's
    `max(eps2, RMS(p))`), measured before the step's weight decay and handed on as
    `param_scale`."""
    return {"param_scale": p.rms().clamp_min(eps2)}


@block(hypers=dict(beta2_decay=-0.8), state=ADAFACTOR_STATE, reads="matrix")
def factored_sqr_avg(p, step, beta2_decay, row_var=None, col_var=None, variance=None, **kwargs):
    """Adafactor's second moment (Shazeer & Stern, 2018, arXiv:1804.04235), with the decay
    `1 - beta2_t = step ** beta2_decay` (default -0.8): for a tensor of 2+ dimensions the row and
    column means of `g**2` (over its last two dimensions) are averaged,
    `row_var <- lerp(row_var, mean_cols(g^2), step**beta2_decay)` and likewise `col_var`; a
    vector (or scalar) keeps the full average `variance`."""
    weight = step ** beta2_decay
    rows, cols, full = [], [], []
    for i, g in enumerate(p.grad.tensors):
        if g.dim() >= 2:
            r = row_var[i] if row_var is not None and row_var[i] is not None else \
                g.new_zeros(_rows(g.shape))
            c = col_var[i] if col_var is not None and col_var[i] is not None else \
                g.new_zeros(_cols(g.shape))
            r.lerp_(torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1)), weight)
            c.lerp_(torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2)), weight)
            rows.append(r), cols.append(c), full.append(None)
        else:
            v = variance[i] if variance is not None and variance[i] is not None else \
                torch.zeros_like(g)
            v.lerp_(g * g, weight)
            rows.append(None), cols.append(None), full.append(v)
    return {"row_var": _per_param(rows), "col_var": _per_param(cols),
            "variance": _per_param(full)}


@block(hypers=dict(eps1=None, d=1.0),
       static=("eps1", "d", "multiply_by_parameter_scale", "relative_step"),
       state=dict(adafactor_update=transient), reads="matrix")
def adafactor_update(p, lr, step, eps1, d, row_var=None, col_var=None, variance=None,
                     param_scale=None, multiply_by_parameter_scale=True, relative_step=True,
                     **kwargs):
    """Adafactor's step (Shazeer & Stern, 2018, arXiv:1804.04235), as torch.optim.Adafactor
    computes it, handed on as `adafactor_update` (`adafactor_step` takes it):
    `V = row_var col_var / max(mean(row_var), eps1)` (factored) or `V = variance`,
    `u = g / sqrt(max(V, eps1**2))`, clipped `u <- u / max(1, RMS(u) / d)` (`d=None`: no
    clipping, optax's `clipping_threshold=None`), `update = alpha u` with
    `alpha = rho * param_scale`, `rho = min(lr, 1/sqrt(step))` (`relative_step=False`:
    `rho = lr`) and `param_scale = max(eps2, RMS(p))` (`multiply_by_parameter_scale=False`: 1).

    Defaults are torch's: `eps1=None` (the dtype's machine epsilon), `d=1.0`.
    """
    rho = lr if not relative_step else minimum(lr, 1 / step ** 0.5)
    updates, scales = [], []
    for i, (t, g) in enumerate(zip(p.tensors, p.grad.tensors)):
        e1 = torch.finfo(t.dtype).eps if eps1 is None else eps1
        if g.dim() >= 2:
            v = row_var[i] @ col_var[i]
            v.div_(row_var[i].mean(dim=-2, keepdim=True).clamp_(min=e1))
        else:
            v = variance[i].clone()
        u = v.clamp_(min=e1 * e1).rsqrt_().mul_(g)
        scale = param_scale[i] * rho if multiply_by_parameter_scale else rho
        if d is not None:
            clip = (torch.linalg.vector_norm(u) / (math.sqrt(u.numel()) * d)).clamp_min(1.0)
            scale = scale / clip
        updates.append(u), scales.append(scale)
    updates = TensorList(updates)
    scales = TensorList(scales) if isinstance(scales[0], torch.Tensor) else scales[0]
    return {"adafactor_update": updates.mul_(scales)}


@block(reads="elements")
def adafactor_step(p, adafactor_update, **kwargs):
    """Adafactor's step: `p <- p - adafactor_update` (see `adafactor_update`)."""
    p.sub_(adafactor_update)


@block(hypers=dict(mom=0.9), state=dict(grad_avg=like_param), reads="elements")
def averaged_adafactor_step(p, adafactor_update, mom, grad_avg=None, **kwargs):
    """Adafactor with momentum (optax's `adafactor(momentum=mom)`, Shazeer & Stern's beta1):
    `grad_avg <- mom grad_avg + (1 - mom) adafactor_update`, `p <- p - grad_avg`."""
    if grad_avg is None:
        grad_avg = p.grad.zeros_like()
    grad_avg.lerp_(adafactor_update, 1 - mom)
    p.sub_(grad_avg)
    return {"grad_avg": grad_avg}


# ---- SOAP ----------------------------------------------------------------------------------------

#: SOAP keeps one Kronecker factor (`gg<i>`) and one eigenbasis (`q<i>`) for each of the first
#: `SOAP_MAX_DIMS` dimensions of a tensor of 2+ dimensions.
SOAP_MAX_DIMS = 4


def _factor_shape(i):
    def shape(s):
        return (s[i], s[i]) if 2 <= len(s) and i < len(s) else None
    return shape


SOAP_STATE = {
    **{f"gg{i}": optional(shaped(_factor_shape(i), f"Shampoo factor of dimension {i}"))
       for i in range(SOAP_MAX_DIMS)},
    **{f"q{i}": optional(shaped(_factor_shape(i), f"eigenbasis of dimension {i}"))
       for i in range(SOAP_MAX_DIMS)},
    "grad_avg": like_param,
    "sqr_avg": like_param,
}


def _rotate(x: torch.Tensor, qs: list, transpose: bool) -> torch.Tensor:
    """`x` with each dimension i multiplied by `qs[i]^T` (`transpose`: into the eigenbasis) or
    `qs[i]` (back); a dimension whose `qs[i]` is None is left as it is."""
    for q in qs:
        if q is None:
            x = x.movedim(0, -1)
        else:
            x = torch.tensordot(x, q, dims=([0], [0] if transpose else [1]))
    return x


def _unfolded_gram(g: torch.Tensor, i: int) -> torch.Tensor:
    """`G_(i) G_(i)^T`, G unfolded along dimension i: its contraction with itself over every
    other dimension."""
    others = [d for d in range(g.dim()) if d != i]
    return torch.tensordot(g, g, dims=(others, others))


@block(hypers=dict(eps=1e-8, shampoo_beta=0.95, precondition_frequency=10,
                   max_precond_dim=10000, wd=0.0),
       static=("precondition_frequency", "max_precond_dim"), switches=("wd",), state=SOAP_STATE,
       reads="matrix")
def soap_step(p, lr, mom, sqr_mom, step, eps, shampoo_beta, precondition_frequency,
              max_precond_dim, wd=0.0, do_wd=True, grad_avg=None, sqr_avg=None, **kwargs):
    """SOAP (Vyas et al., 2024, arXiv:2409.11321): Adam in the eigenbasis of Shampoo's factors.

    For a tensor of 2+ dimensions (at most 4), each dimension `i` of size at most
    `max_precond_dim` keeps the factor `gg_i <- lerp(gg_i, G_(i) G_(i)^T, 1 - shampoo_beta)` (for
    a matrix: `L = G G^T`, `R = G^T G`) and its eigenbasis `q_i`; a larger dimension, and a
    vector, is not rotated.  With `rot(X)` X in the eigenbasis (`X x_i q_i^T`) and `back` the
    inverse:

    * the first step only starts the factors from its gradient and takes `q_i = eigh(gg_i)`'s
      eigenvectors (descending eigenvalues): no parameter moves, so the projection never uses
      the gradient it projects;
    * every later step, `t = step - 1`: `grad_avg <- lerp(grad_avg, g, 1 - mom)` (in the
      parameter's basis), `sqr_avg <- lerp(sqr_avg, rot(g)**2, 1 - sqr_mom)` (in the eigenbasis),
      `p <- p - lr sqrt(1 - sqr_mom^t) / (1 - mom^t) * back(rot(grad_avg) / (sqrt(sqr_avg) + eps))`,
      then decoupled weight decay `p <- p (1 - lr wd)` (after the step, as the paper's code;
      skipped where `do_wd` is False), then the factors take `g`; every `precondition_frequency` steps (`t % f == 0`) each basis
      is refreshed by one power iteration and a QR decomposition, `q_i <- qr(gg_i q_i)`, after
      ordering its columns by the estimated eigenvalues `diag(q_i^T gg_i q_i)` (descending, with
      `sqr_avg` permuted alike along dimension i).  Where the step count is a tensor (in a
      compiled graph) the refresh is computed at every step and kept where `t % f == 0`.

    Defaults: the paper's `eps=1e-8`, `shampoo_beta=0.95`, `precondition_frequency=10`,
    `max_precond_dim=10000`.
    """
    kept = {f"gg{i}": kwargs.get(f"gg{i}") for i in range(SOAP_MAX_DIMS)}
    kept.update({f"q{i}": kwargs.get(f"q{i}") for i in range(SOAP_MAX_DIMS)})
    first = grad_avg is None
    if first:
        grad_avg, sqr_avg = p.grad.zeros_like(), p.grad.zeros_like()
    out = {name: [] for name in kept}
    t = step - 1
    for j, (x, g) in enumerate(zip(p.tensors, p.grad.tensors)):
        if g.dim() > SOAP_MAX_DIMS:
            raise ValueError(f"SOAP preconditions tensors of at most {SOAP_MAX_DIMS} dimensions, "
                             f"got shape {tuple(g.shape)}")
        dims = [i for i in range(g.dim()) if g.dim() >= 2 and g.size(i) <= max_precond_dim]
        ggs = [kept[f"gg{i}"][j] if not first and i in dims else None for i in range(g.dim())]
        qs = [kept[f"q{i}"][j] if not first and i in dims else None for i in range(g.dim())]
        m, v = grad_avg[j], sqr_avg[j]
        if first:
            for i in dims:
                ggs[i] = _unfolded_gram(g, i).mul_(1 - shampoo_beta)
                eye = torch.eye(g.size(i), dtype=g.dtype, device=g.device)
                qs[i] = torch.linalg.eigh(ggs[i] + 1e-30 * eye).eigenvectors.flip(-1)
        else:
            m.lerp_(g, 1 - mom)
            v.lerp_(_rotate(g, qs, True).square(), 1 - sqr_mom)
            # (out of place: for a tensor not rotated, `_rotate` returns a view of the moment)
            direction = _rotate(_rotate(m, qs, True).div(v.sqrt().add_(eps)), qs, False)
            scale = lr * math.sqrt(1 - sqr_mom ** t) / (1 - mom ** t) \
                if not isinstance(t, torch.Tensor) else \
                lr * (1 - sqr_mom ** t).sqrt() / (1 - mom ** t)
            x.sub_(direction.mul_(scale))
            if do_wd and not is_zero(wd):
                x.mul_(1 - lr * wd)
            for i in dims:
                ggs[i].lerp_(_unfolded_gram(g, i), 1 - shampoo_beta)
            refresh = t % precondition_frequency == 0
            if refresh is not False:
                for i in dims:
                    estimated = torch.diagonal(qs[i].mT @ ggs[i] @ qs[i])
                    order = torch.argsort(estimated, descending=True)
                    v_sorted = v.index_select(i, order)
                    q_new = torch.linalg.qr(ggs[i] @ qs[i][:, order]).Q
                    if refresh is True:
                        v.copy_(v_sorted)
                        qs[i] = q_new
                    else:  # a tensor step count: both computed, one kept, no branch on it
                        v.copy_(torch.where(refresh, v_sorted, v))
                        qs[i] = torch.where(refresh, q_new, qs[i])
        for i in range(SOAP_MAX_DIMS):
            out[f"gg{i}"].append(ggs[i] if i < len(ggs) else None)
            out[f"q{i}"].append(qs[i] if i < len(qs) else None)
    result = {name: _per_param(values) for name, values in out.items()}
    result.update(grad_avg=grad_avg, sqr_avg=sqr_avg)
    return result
