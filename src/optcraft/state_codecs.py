"""How optimizer state is stored: float32, bfloat16, or block-wise 8-bit / 4-bit codes.

`Optimizer(..., state_bits=32 | 16 | 8 | 4)` (and every named optimizer) chooses it.  The engine
applies it *around* the chain, bucket by bucket (`optcraft.engine.run_bucket`): the bucket's
stored state is decoded to the dtype the chain computes in right after it is gathered, the chain
runs as always, and the state it leaves is encoded again before it is written back.  No block
knows; only one bucket's state is ever held decoded (at most `foreach.MIN_CHUNK_NUMEL` elements,
or the largest parameter).

What is encoded: the floating-point entries a block declares `like_param` (Adam's moments, SGD's
momentum...) of real floating-point parameters.  Step counts, 0-d tensors, factored or other
`shaped` statistics, master weights and entries no block declares (Lookahead's slow weights) are
kept as they are, and so is the state of complex parameters.

* `state_bits=32`: as it is (float32, or the parameter's dtype for a half-precision parameter
  without master weights).
* `state_bits=16`: bfloat16 (every size).
* `state_bits=8` / `4`: a tensor of at least `MIN_NUMEL` elements is cut in blocks of
  `BLOCK[bits]` elements (256 for 8 bits, 128 for 4; the last block padded with zeros); each
  block keeps its largest magnitude `absmax` (float32) and one code per element, the index of the
  value of the *code map* nearest to `x / absmax` (ties to the lower code).  4-bit codes are
  packed two to a byte, the even element in the low nibble.  Smaller tensors stay as they are at
  32 bits.  So 8 bits cost 1 + 4/256 bytes per element and 4 bits 0.5 + 4/128.

The code map (`code_map(bits, signed)`) is a dynamic, non-linear map in the spirit of Dettmers
et al. (2022, "8-bit Optimizers via Block-wise Quantization"): values are spread over decades,
finer near the block's maximum, down to `10**-(m-1)` of it, with `m` magnitude bits (`bits - 1`
signed, `bits` unsigned).  Decade `e` (`e = 0 .. m-1`) holds `2**e` values
`10**(e - m + 1) * (0.1 + 0.9 * j / 2**e)`, `j = 1 .. 2**e`; so 1.0 is a code and the largest
element of a block is stored exactly.

* signed (a momentum; the default for `like_param`): 0, those `2**m - 1` values and their
  negatives, `2**bits - 1` codes (the last code, 255 or 15, is never written);
* unsigned (declared with `blocks.base.nonnegative`: a second moment): those values and
  `10**-m` in place of 0, so that a positive statistic never decodes to 0 (a second moment
  rounded to 0 would leave an update divided by `eps` alone); a block of zeros has `absmax = 0`
  and decodes to zeros.

Error bound: an element decodes within half the gap between the two codes around `x / absmax`,
times `absmax` (the gap is 0.9 / 2**(m-1) * absmax in the top decade: 0.0070 for 8-bit signed,
0.0035 for 8-bit unsigned, 0.225 for 4-bit signed, 0.1125 for 4-bit unsigned), exactly the
nearest-code rounding; `max_error(bits, signed, x, absmax)` gives it per element.

In `opt.state[p]` (and so in `state_dict()`, which loads with `weights_only=True`) an encoded
entry `name` holds its codes (uint8, one dimension) and `name + ".absmax.<bits><s|u>"` its block
scales: `grad_avg` and `grad_avg.absmax.8s`.  The format is in the key, so any state decodes
whatever the optimizer's `state_bits`: `load_state_dict` converts a checkpoint saved at other
bits (a float32 one into an 8-bit optimizer: the quantisation error above, once; back to float32:
exact), and changing `opt.state_bits` takes effect at the next step.

`rounding`: how the step writes a float32 result into bfloat16/float16 storage where nothing
else keeps the float32 value: the parameters when `master_weights=False` and bfloat16 state
(`state_bits=16`).  "stochastic" (the default) rounds up or down at random with the probabilities
that make the rounding unbiased (`stochastic_round`); "nearest" is torch's rounding, under which
an update smaller than half the parameter's spacing is lost, step after step.  With
`master_weights=False` and stochastic rounding, each bucket's half-precision parameters are
upcast to float32 for the chain (a temporary, one bucket at a time) and rounded back.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch

from .tensorlist import TensorList

STATE_BITS = (32, 16, 8, 4)
ROUNDINGS = ("nearest", "stochastic")
#: elements per block, by bits
BLOCK = {8: 256, 4: 128}
#: tensors smaller than this are not block-quantised (kept as at 32 bits)
MIN_NUMEL = 4096
#: the key of an encoded entry's scales: name + SCALE_TAG + bits + "s" or "u"
SCALE_TAG = ".absmax."
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check(state_bits, rounding) -> None:
    """TypeError/ValueError for a `state_bits` or `rounding` that is not one of the choices."""
    if isinstance(state_bits, bool) or state_bits not in STATE_BITS:
        raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits!r}")
    if rounding is not None and rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def configure(opt, state_bits=None, rounding=None) -> None:
    """Set `state_bits` / `rounding` (those not None) on the optimizer that runs the chain,
    inside wrappers such as Lookahead (what `hypers.torch_names` does for a named recipe)."""
    while not hasattr(opt, "chains") and hasattr(opt, "opt"):
        opt = opt.opt
    check(state_bits if state_bits is not None else getattr(opt, "state_bits", 32), rounding)
    if state_bits is not None:
        opt.state_bits = state_bits
    if rounding is not None:
        opt.rounding = rounding


# ---- the code maps and the quantiser ---------------------------------------------------------

@functools.lru_cache(maxsize=None)
def code_map(bits: int, signed: bool) -> tuple[float, ...]:
    """The values of the codes, ascending (see the module docstring), as Python floats."""
    m = bits - 1 if signed else bits
    magnitudes = []
    for e in range(m):
        count = 2 ** e
        magnitudes += [10.0 ** (e - m + 1) * (0.1 + 0.9 * j / count) for j in range(1, count + 1)]
    if signed:
        values = sorted([-v for v in magnitudes] + [0.0] + magnitudes)
    else:
        values = sorted([10.0 ** -m] + magnitudes)
    assert len(values) <= 2 ** bits
    return tuple(values)


@functools.lru_cache(maxsize=None)
def _tables(bits: int, signed: bool, device: torch.device):
    """(values, midpoints between neighbours) as float32 tensors on `device`."""
    values = code_map(bits, signed)
    mids = [(a + b) / 2 for a, b in zip(values[:-1], values[1:])]
    return (torch.tensor(values, dtype=torch.float32, device=device),
            torch.tensor(mids, dtype=torch.float32, device=device))


#: quantising, dequantising and stochastic rounding work through a tensor in pieces of this
#: many elements, so that their temporaries stay small next to the bucket's decoded state
CHUNK_NUMEL = 1 << 18


def quantize(x: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of `x`: codes uint8 of one dimension (packed two to a byte at 4 bits),
    absmax float32, one per block of `BLOCK[bits]` elements."""
    size = BLOCK[bits]
    flat = x.detach().reshape(-1)
    n = flat.numel()
    n_blocks = max(1, math.ceil(n / size))
    if n_blocks * size != n:
        flat = torch.nn.functional.pad(flat, (0, n_blocks * size - n))
    blocks = flat.view(n_blocks, size)
    values, mids = _tables(bits, signed, x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    codes = torch.empty(n_blocks * size // (8 // bits), dtype=torch.uint8, device=x.device)
    rows = max(1, CHUNK_NUMEL // size)
    per_row = size // (8 // bits)
    for i in range(0, n_blocks, rows):
        piece = blocks[i:i + rows].float()
        top = piece.abs().amax(dim=1)
        absmax[i:i + rows] = top
        piece = piece / top.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        found = torch.searchsorted(mids, piece.reshape(-1), out_int32=True)
        found = found.clamp_(0, len(values) - 1)  # (a NaN would search past the end)
        if bits == 4:
            found = found[0::2] | (found[1::2] << 4)
        codes[i * per_row:(i + rows) * per_row] = found
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool,
               shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of `shape` that `quantize` encoded as (codes, absmax), in `dtype`."""
    n = math.prod(shape)
    size = BLOCK[bits]
    n_blocks = absmax.numel()
    values, _ = _tables(bits, signed, codes.device)
    out = torch.empty(n_blocks, size, dtype=torch.float32, device=codes.device)
    rows = max(1, CHUNK_NUMEL // size)
    per_row = size // (8 // bits)
    for i in range(0, n_blocks, rows):
        piece = codes[i * per_row:(i + rows) * per_row]
        if bits == 4:
            piece = torch.stack((piece & 15, piece >> 4), dim=-1).reshape(-1)
        got = values.index_select(0, piece.to(torch.int32)).view(-1, size)
        out[i:i + rows] = got.mul_(absmax[i:i + rows].to(torch.float32).unsqueeze(1))
    out = out.view(-1)[:n].view(shape)
    return out if dtype == torch.float32 else out.to(dtype)


def max_error(bits: int, signed: bool, x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Per element of `x` (flat, `absmax` per block as `quantize` gives it): half the gap between
    the two codes around `x / absmax`, times absmax: the most its round trip may be off (in
    the shape of `x`)."""
    size = BLOCK[bits]
    flat = x.detach().reshape(-1).float()
    scale = absmax.repeat_interleave(size)[:flat.numel()]
    values, _ = _tables(bits, signed, x.device)
    normed = flat / scale.clamp_min(torch.finfo(torch.float32).tiny)
    upper = torch.searchsorted(values, normed).clamp(1, len(values) - 1)
    gap = values[upper] - values[upper - 1]
    return (0.5 * gap * scale).view(x.shape)


# ---- stochastic rounding ---------------------------------------------------------------------

def stochastic_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` (float32) in `dtype` (bfloat16 or float16), rounded to one of its two neighbours at
    random: away from zero with probability (|x| - |below|) / (|above| - |below|), so the
    expectation is `x`.

    bfloat16 is float32's upper 16 bits: a uniform random integer in [0, 2**16) is added to the
    float32 bit pattern and the lower 16 bits are cut (one int32 temporary per element); the carry
    reaches the kept bits with probability (the lower bits) / 2**16.  float16: the nearest value,
    and its neighbour on the other side of `x` with the probability of the remainder."""
    if dtype == torch.bfloat16 and x.dtype == torch.float32:
        flat = x.contiguous().view(-1).view(torch.int32)
        out = torch.empty(flat.shape, dtype=torch.bfloat16, device=x.device)
        for i in range(0, flat.numel(), CHUNK_NUMEL):
            piece = flat[i:i + CHUNK_NUMEL]
            noise = torch.randint(0, 1 << 16, piece.shape, dtype=torch.int32, device=x.device)
            noise.add_(piece).bitwise_and_(-65536)
            out[i:i + CHUNK_NUMEL] = noise.view(torch.float32)
        return out.view(x.shape)
    nearest = x.to(dtype)
    error = x - nearest.float()
    toward = torch.where(error > 0, torch.tensor(math.inf, dtype=dtype, device=x.device),
                         torch.tensor(-math.inf, dtype=dtype, device=x.device))
    other = torch.nextafter(nearest, toward)
    gap = other.float() - nearest.float()
    chance = torch.where(gap != 0, error / gap, torch.zeros_like(error))
    return torch.where(torch.rand_like(x) < chance, other, nearest)


def write_stochastic(params, values) -> None:
    """Round float32 `values` into the half-precision `params` stochastically (in place)."""
    for p, v in zip(params, values):
        p.copy_(stochastic_round(v, p.dtype))


# ---- state entries ---------------------------------------------------------------------------

def scale_key(name: str, bits: int, signed: bool) -> str:
    return f"{name}{SCALE_TAG}{bits}{'s' if signed else 'u'}"


def parse_scale_key(key: str) -> tuple[str, int, bool] | None:
    """(name, bits, signed) of a scale key, or None for any other key."""
    if not isinstance(key, str) or SCALE_TAG not in key:
        return None
    name, fmt = key.rsplit(SCALE_TAG, 1)
    if fmt[-1:] not in ("s", "u") or not fmt[:-1].isdigit() or int(fmt[:-1]) not in BLOCK:
        return None
    return name, int(fmt[:-1]), fmt[-1] == "s"


def encoded_length(numel: int, bits: int) -> tuple[int, int]:
    """(codes, scales) an encoded tensor of `numel` elements holds."""
    blocks = max(1, math.ceil(numel / BLOCK[bits]))
    return blocks * BLOCK[bits] * bits // 8, blocks


def _first(value) -> torch.Tensor | None:
    """The first tensor of a state entry's TensorList (an entry kept for some tensors of a bucket
    only holds None for the others: Adafactor's, SOAP's), or None."""
    if not isinstance(value, TensorList):
        return None
    return next((t for t in value.tensors if t is not None), None)


class StateCodec:
    """The storage of one optimizer's state: `state_bits`, `rounding` (see the module
    docstring) and `min_numel`."""

    def __init__(self, state_bits: int = 32, rounding: str | None = None,
                 min_numel: int = MIN_NUMEL):
        check(state_bits, rounding)
        self.state_bits, self.rounding, self.min_numel = state_bits, rounding or "stochastic", \
            min_numel

    def stochastic_params(self, dtype: torch.dtype, with_master: bool) -> bool:
        """Whether a bucket of `dtype` parameters runs on float32 copies rounded back
        stochastically (half precision without master weights, stochastic rounding)."""
        return not with_master and dtype in LOW_PRECISION and self.rounding == "stochastic"

    def encodes(self, param: torch.Tensor, rule) -> bool:
        """Whether entry `rule` of `param` is ever stored otherwise than as the chain made it."""
        return rule is not None and rule.kind == "tensor" and rule.like_param and \
            param.is_floating_point()

    def format_for(self, param: torch.Tensor, rule) -> tuple:
        """("quantized", bits, signed), or ("dtype", dtype or None: as it is)."""
        if self.state_bits in BLOCK and param.numel() >= self.min_numel:
            return ("quantized", self.state_bits, bool(getattr(rule, "signed", True)))
        if self.state_bits == 16:
            return ("dtype", torch.bfloat16)
        return ("dtype", None)

    def stored_bytes(self, param: torch.Tensor, rule, dtype: torch.dtype | None = None) -> int:
        """The bytes state entry `rule` of `param` is kept in, by the rules `encode` follows:
        codes and block scales where it is quantised, bfloat16 at 16 bits, else `dtype` (the
        dtype the chain makes it in; default the parameter's) for entries never encoded.  From
        the specification alone: `param` may be on the meta device."""
        numel = rule.numel_for(param)
        size = torch.empty((), dtype=dtype or param.dtype).element_size()
        if not numel or not self.encodes(param, rule) or param.is_complex():
            return numel * size
        fmt = self.format_for(param, rule)
        if fmt[0] == "quantized":
            codes, scales = encoded_length(numel, fmt[1])
            return codes + scales * 4  # uint8 codes, float32 scales
        return numel * (size if fmt[1] is None else torch.empty((), dtype=fmt[1]).element_size())

    # -- around the chain (engine.run_bucket) --
    def decode(self, values: dict, params: list, dtype: torch.dtype, rules: Mapping) -> dict:
        """`values` (a bucket's gathered state) with every encoded entry of the parameters
        `params`, and every half-precision like-parameter entry (`rules`, the chain's kept
        state) where the chain computes in float32, as the chain computes it: `dtype`, the
        parameters' shapes."""
        for key in [k for k in values if SCALE_TAG in k]:
            found = parse_scale_key(key)
            if found is None or found[0] not in values:
                continue
            name, bits, signed = found
            scales = values.pop(key)
            codes = values[name]
            values[name] = TensorList([
                dequantize(c, s, bits, signed, tuple(p.shape), dtype)
                for c, s, p in zip(codes.tensors, scales.tensors, params)])
        if dtype not in LOW_PRECISION:
            for name, rule in rules.items():
                value = values.get(name)
                first = _first(value)
                if first is not None and rule.like_param and first.dtype in LOW_PRECISION:
                    values[name] = TensorList([t if t is None else t.to(dtype)
                                               for t in value.tensors])
        return values

    def encode(self, values: dict, params: list, state, rules: Mapping, stored: torch.dtype | None):
        """Store the like-parameter entries of `values` (the state after the chain, for the
        bucket's parameters `params`) in `state` in this codec's format, and remove them from
        `values` (the rest is written back as always).  `stored`: the dtype unencoded entries
        are kept in (None: as the chain made them)."""
        if params[0].is_complex() or self._unchanged(values, state[params[0]], rules, stored):
            return values
        for name, rule in rules.items():
            value = values.get(name)
            first = _first(value)
            if first is None or not self.encodes(params[0], rule) or \
                    not first.is_floating_point() or any(t is None for t in value.tensors):
                continue
            for p, t in zip(params, value.tensors):
                _store(state[p], name, t, self.format_for(p, rule), stored, self)
            del values[name]
        return values

    def _unchanged(self, values: dict, first: dict, rules: Mapping, stored) -> bool:
        """Whether 32-bit state would be stored as the chain left it (the fast way out: no
        Python work per parameter)."""
        if self.state_bits != 32 or any(isinstance(k, str) and SCALE_TAG in k for k in first):
            return False
        if stored is None:
            return True
        for name in rules:
            first = _first(values.get(name))
            if first is not None and first.is_floating_point() and first.dtype != stored:
                return False
        return True

    # -- checkpoints (optimizer._checked_state) --
    def load(self, own: dict, param: torch.Tensor, rules: Mapping,
             stored: torch.dtype | None, originals: dict) -> dict:
        """A parameter's loaded state (decoded by `split_encoded`) in this codec's format; an
        entry saved in that very format keeps its codes (`originals`), exactly."""
        out = dict(own)
        for name, rule in (rules or {}).items():
            value = out.get(name)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or \
                    not self.encodes(param, rule) or param.is_complex():
                continue
            fmt = self.format_for(param, rule)
            original = originals.get(name)
            if original is not None and fmt == ("quantized", original[0], original[1]):
                out[name] = original[2].to(param.device)
                out[scale_key(name, original[0], original[1])] = \
                    original[3].to(device=param.device, dtype=torch.float32)
                continue
            _store(out, name, value, fmt, stored, self)
        return out


def _store(st: dict, name: str, t: torch.Tensor, fmt: tuple, stored, codec: StateCodec) -> None:
    for key in [k for k in st if isinstance(k, str) and k.startswith(name + SCALE_TAG)]:
        del st[key]  # a format stored before
    if fmt[0] == "quantized":
        _, bits, signed = fmt
        st[name], st[scale_key(name, bits, signed)] = quantize(t, bits, signed)
        return
    dtype = fmt[1] or stored
    if dtype is None or t.dtype == dtype:
        st[name] = t
    elif dtype in LOW_PRECISION and codec.rounding == "stochastic":
        st[name] = stochastic_round(t.float(), dtype)
    else:
        st[name] = t.to(dtype)


def split_encoded(values: Mapping[str, Any], param: torch.Tensor) -> tuple[dict, dict]:
    """A parameter's saved state with its encoded entries decoded to float32 of the
    parameter's shape, and those entries as they were: name -> (bits, signed, codes, absmax).
    ValueError where codes and scales do not fit the parameter."""
    out, originals = dict(values), {}
    for key in [k for k in values if SCALE_TAG in str(k)]:
        found = parse_scale_key(key)
        if found is None:
            continue
        name, bits, signed = found
        codes, scales = out.get(name), out.pop(key)
        n_codes, n_scales = encoded_length(param.numel(), bits)
        if not isinstance(codes, torch.Tensor) or not isinstance(scales, torch.Tensor) or \
                codes.dtype != torch.uint8 or codes.shape != (n_codes,) or \
                scales.shape != (n_scales,):
            raise ValueError(f"state {name!r}: {bits}-bit codes and scales that do not fit a "
                             f"parameter of shape {tuple(param.shape)} (expected {n_codes} uint8 "
                             f"codes and {n_scales} scales)")
        originals[name] = (bits, signed, codes, scales)
        out[name] = dequantize(codes, scales.float(), bits, signed, tuple(param.shape))
    return out, originals


def decoded(st: Mapping[str, Any], param: torch.Tensor, dtype: torch.dtype,
            rules: Mapping) -> dict:
    """A parameter's state with its encoded and half-precision like-parameter entries in `dtype`
    (for reading it outside a step: the evaluation point)."""
    out, originals = split_encoded(st, param)
    for name, rule in (rules or {}).items():
        v = out.get(name)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and rule.kind == "tensor" and \
                rule.like_param and (name in originals or v.dtype in LOW_PRECISION):
            out[name] = v.to(dtype)
    return out


def state_bytes(opt) -> tuple[int, int]:
    """(bytes of the tensors kept in `opt.state`, parameters with state): what the state costs,
    measured from the tensors themselves."""
    total, params = 0, 0
    for p, st in opt.state.items():
        params += p.numel()
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total, params
