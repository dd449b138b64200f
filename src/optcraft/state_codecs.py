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

FSDP2's sharded parameters (DTensors) keep the blocks, scales and codes of the whole tensor
(`optcraft.distributed.quantize_shards`: a block may straddle two ranks), the codes one per
element, shaped and sharded as the parameter; `state_bits=4` is refused for them.

`rounding`: how the step writes a float32 result into bfloat16/float16 storage where nothing
else keeps the float32 value: the parameters when `master_weights=False` and bfloat16 state
(`state_bits=16`).  "stochastic" (the default) rounds up or down at random with the probabilities
that make the rounding unbiased (`stochastic_round`); "nearest" is torch's rounding, under which
an update smaller than half the parameter's spacing is lost, step after step.  With
`master_weights=False` and stochastic rounding, each bucket's half-precision parameters are
upcast to float32 for the chain (a temporary, one bucket at a time) and rounded back.
"""
from __future__ import annotations

import bisect
import functools
import math
import struct
from typing import Any, Mapping

import torch

from .distributed import distribution_of
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
def code_midpoints(bits: int, signed: bool) -> tuple[float, ...]:
    """The midpoints between neighbouring codes (ascending): a value above the midpoint `i`
    (and at most the next) gets code `i + 1`."""
    values = code_map(bits, signed)
    return tuple((a + b) / 2 for a, b in zip(values[:-1], values[1:]))


@functools.lru_cache(maxsize=None)
def _values(bits: int, signed: bool, device: torch.device) -> torch.Tensor:
    """The code map's values as a float32 tensor on `device`."""
    return torch.tensor(code_map(bits, signed), dtype=torch.float32, device=device)


#: quantising, dequantising and stochastic rounding work through a tensor in pieces of this
#: many elements, so that their temporaries stay small next to the bucket's decoded state
CHUNK_NUMEL = 1 << 18


def _blocks(x: torch.Tensor, bits: int) -> torch.Tensor:
    """`x` flat, padded with zeros to whole blocks, as (blocks, BLOCK[bits])."""
    size = BLOCK[bits]
    flat = x.detach().reshape(-1)
    n = flat.numel()
    n_blocks = max(1, math.ceil(n / size))
    if n_blocks * size != n:
        flat = torch.nn.functional.pad(flat, (0, n_blocks * size - n))
    return flat.view(n_blocks, size)


def _encode_rows(rows: torch.Tensor, bits: int, find) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of whole blocks `rows` (blocks, size): the codes flat, uint8, packed two a
    byte at 4 bits; `find(normed)` gives the code of each value divided by its block's absmax
    (the nearest, the lower on a tie: `nearest_codes`)."""
    rows = rows.float()
    top = rows.abs().amax(dim=1)
    normed = rows / top.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    # (kept in blocks: traced, the codes are then computed in the loop over a block that
    # finds its absmax)
    found = find(normed)
    if bits == 4:
        found = found[:, 0::2] | (found[:, 1::2] << 4)
    return found.to(torch.uint8).reshape(-1), top


def _float32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _float32_of_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


@functools.lru_cache(maxsize=None)
def _code_lookup(bits: int, signed: bool) -> tuple:
    """The table `nearest_codes` reads: the positive values' float32 bit patterns, shifted right
    by `shift`, cut [0, 1] into ranges (the lowest from 0, the last holding 1.0) so fine that
    each holds at most one midpoint between codes: per range, how many midpoints lie below it
    and the one in it (inf where none), as its float32 bit pattern.  (shift, first range's
    index, the code of 0 (signed), the counts, the midpoints' patterns.)  In plain Python (it may
    first be needed inside a trace)."""
    mids = [_float32_of_bits(_float32_bits(m)) for m in code_midpoints(bits, signed)]
    zero = (len(code_map(bits, signed)) - 1) // 2 if signed else 0
    mids = mids[zero:]  # signed: those above 0 (the map is symmetric)
    for kept_bits in range(2, 24):  # mantissa bits that tell the ranges apart
        shift = 23 - kept_bits
        first = (_float32_bits(mids[0]) >> shift) - 1
        index = range(first, (_float32_bits(1.0) >> shift) + 1)
        below = [0] + [bisect.bisect_left(mids, _float32_of_bits(i << shift)) for i in index[1:]]
        upto = [bisect.bisect_left(mids, _float32_of_bits((i + 1) << shift)) for i in index]
        if all(b - a <= 1 for a, b in zip(below, upto)):
            break
    inside = [_float32_bits(mids[a] if b > a else math.inf) for a, b in zip(below, upto)]
    return shift, first, zero, tuple(below), tuple(inside)


def nearest_codes(normed: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The codes (int32) of `normed` (values divided by their block's absmax) exactly as a
    binary search of the midpoints between codes finds them (the nearest code, the lower on a
    tie; a NaN, or a value above 1, gets the last code, one below -1 the first, and in an
    unsigned map any negative value the first), element by element with no search: the top bits
    of |value|'s float32 pattern pick a range of [0, 1] holding at most one midpoint
    (`_code_lookup`), and one comparison with it settles the code.  Integer arithmetic on the
    bit patterns (a non-negative float32 orders as its pattern does) and two table reads an
    element, with no `where`: fast eagerly (torch's CPU `where` costs several times an integer
    operation), and fused into a compiled step's loops by inductor."""
    shift, first, zero, below, inside = _code_lookup(bits, signed)
    below = torch.tensor(below, dtype=torch.int32, device=normed.device)
    inside = torch.tensor(inside, dtype=torch.int32, device=normed.device)
    last = len(code_map(bits, signed)) - 1
    size = normed.view(torch.int32) & 0x7FFFFFFF  # |value|'s pattern (a NaN's above inf's)
    # (the range of a value above 1, an inf or a NaN: the last one, holding 1.0)
    where = ((size >> shift) - first).clamp_(0, below.numel() - 1).reshape(-1)
    count = below.index_select(0, where).view(size.shape)
    mid = inside.index_select(0, where).view(size.shape)
    negative = (normed < 0).to(torch.int32)  # (a NaN is not: it gets the last code)
    if signed:
        # value -t: the codes below 0 mirror those above it, and its tie goes to the larger
        # magnitude (the lower code): zero + count + (mid < t), or zero - count - (mid <= t)
        steps = count + (mid < size).to(torch.int32) + negative * (mid == size).to(torch.int32)
        code = zero + steps * (1 - 2 * negative)
    else:
        code = (count + (mid < size).to(torch.int32)) * (1 - negative)
    # beyond the map's ends (a NaN or an inf counts one past them)
    return code.clamp_(0, last)


def _decode_rows(codes: torch.Tensor, absmax: torch.Tensor, bits: int,
                 values: torch.Tensor) -> torch.Tensor:
    """The blocks (blocks, size) that `_encode_rows` encoded as (codes, absmax), in float32."""
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(-1)
    got = values.index_select(0, codes.to(torch.int32)).view(absmax.numel(), BLOCK[bits])
    return got * absmax.to(torch.float32).unsqueeze(1)


def quantize(x: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of `x`: codes uint8 of one dimension (packed two to a byte at 4 bits),
    absmax float32, one per block of `BLOCK[bits]` elements.  In pieces of `CHUNK_NUMEL`
    elements (small temporaries)."""
    find = functools.partial(nearest_codes, bits=bits, signed=signed)
    if distribution_of(x) is not None:  # FSDP2's shards: the blocks of the whole tensor
        from .distributed import quantize_shards

        return quantize_shards(x, BLOCK[bits], find)
    blocks = _blocks(x, bits)
    n_blocks, size = blocks.shape
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    codes = torch.empty(n_blocks * size // (8 // bits), dtype=torch.uint8, device=x.device)
    rows = max(1, CHUNK_NUMEL // size)
    per_row = size // (8 // bits)
    for i in range(0, n_blocks, rows):
        codes[i * per_row:(i + rows) * per_row], absmax[i:i + rows] = \
            _encode_rows(blocks[i:i + rows], bits, find)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool,
               shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of `shape` that `quantize` encoded as (codes, absmax), in `dtype`."""
    n = math.prod(shape)
    size = BLOCK[bits]
    n_blocks = absmax.numel()
    values = _values(bits, signed, codes.device)
    if distribution_of(codes) is not None:  # FSDP2's shards (`quantize`)
        from .distributed import dequantize_shards

        return dequantize_shards(codes, absmax, size, values, dtype)
    out = torch.empty(n_blocks, size, dtype=torch.float32, device=codes.device)
    rows = max(1, CHUNK_NUMEL // size)
    per_row = size // (8 // bits)
    for i in range(0, n_blocks, rows):
        out[i:i + rows] = _decode_rows(codes[i * per_row:(i + rows) * per_row],
                                       absmax[i:i + rows], bits, values)
    out = out.view(-1)[:n].view(shape)
    return out if dtype == torch.float32 else out.to(dtype)


# ---- inside a traced step (the compiled path) ------------------------------------------------
#
# The same arithmetic as `quantize` / `dequantize`, written as one expression over a whole tensor
# (no pieces, no writes into a buffer) with the code map made inside the trace: the compiled
# path traces it with the chain, and inductor fuses it into the step's loops, so that a step
# reads the codes and writes new ones with no float32 copy of the state in between.

def _pop_scales(values: dict, keep: frozenset = frozenset()) -> list:
    """The quantised entries of `values` (a bucket's state) but those named in `keep`: (name,
    bits, signed, scales) each, their scales removed from `values` (the codes stay under
    `name`, for the caller to replace with the decoded tensors)."""
    found = []
    for key in [k for k in values if SCALE_TAG in k]:
        parsed = parse_scale_key(key)
        if parsed is None or parsed[0] not in values or parsed[0] in keep:
            continue
        found.append((*parsed, values.pop(key)))
    return found


def decode_traced(values: dict, shapes: list, dtype: torch.dtype) -> dict:
    """Every quantised entry of `values` (a bucket's state, `TensorList`s, for parameters of
    `shapes`) decoded to `dtype` in place, its scales removed; returns the formats found,
    name -> (bits, signed), for `encode_traced`."""
    formats = {}
    for name, bits, signed, scales in _pop_scales(values):
        # (made here, not taken from `_values`' cache: a trace makes its own constants)
        table = torch.tensor(code_map(bits, signed), dtype=torch.float32,
                             device=scales.tensors[0].device)
        decoded_ = [_decode_rows(c, s, bits, table).view(-1)[:math.prod(shape)].view(shape)
                    .to(dtype) for c, s, shape in zip(values[name].tensors, scales.tensors, shapes)]
        values[name] = TensorList(decoded_)
        formats[name] = (bits, signed)
    return formats


def encode_traced(values: dict, formats: dict) -> None:
    """The entries `decode_traced` decoded, encoded again in place in the same formats."""
    for name, (bits, signed) in formats.items():
        find = functools.partial(nearest_codes, bits=bits, signed=signed)
        encoded = [_encode_rows(_blocks(t, bits), bits, find) for t in values[name].tensors]
        values[name] = TensorList([codes for codes, _ in encoded])
        values[scale_key(name, bits, signed)] = TensorList([top for _, top in encoded])


def max_error(bits: int, signed: bool, x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Per element of `x` (flat, `absmax` per block as `quantize` gives it): half the gap between
    the two codes around `x / absmax`, times absmax: the most its round trip may be off (in
    the shape of `x`)."""
    size = BLOCK[bits]
    flat = x.detach().reshape(-1).float()
    scale = absmax.repeat_interleave(size)[:flat.numel()]
    values = _values(bits, signed, x.device)
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
    def decode(self, values: dict, params: list, dtype: torch.dtype, rules: Mapping,
               keep: frozenset = frozenset()) -> dict:
        """`values` (a bucket's gathered state) with every encoded entry of the parameters
        `params` (but those named in `keep`: a compiled step decodes them itself, see
        `in_own_format`), and every half-precision like-parameter entry (`rules`, the chain's
        kept state) where the chain computes in float32, as the chain computes it: `dtype`, the
        parameters' shapes."""
        if self.state_bits == 4 and any(distribution_of(p) is not None and
                                        p.numel() >= self.min_numel for p in params):
            raise ValueError("state_bits=4 is not supported for FSDP2's sharded parameters (two "
                             "codes share a byte, which a shard boundary may split); use "
                             "state_bits=8")
        decode_quantized(values, params, dtype, keep)
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

    def in_own_format(self, values: dict, params: list, rules: Mapping) -> frozenset:
        """The quantised entries of `values` (a bucket's state) stored in the format this codec
        would store them in for every one of `params` (an entry stored at other bits is to be
        converted, by `decode` and `encode`)."""
        found = set()
        for key in values:
            parsed = parse_scale_key(key)
            if parsed is None or parsed[0] not in values or parsed[0] not in rules:
                continue
            name, bits, signed = parsed
            if all(self.format_for(p, rules[name]) == ("quantized", bits, signed)
                   for p in params):
                found.add(name)
        return frozenset(found)

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


def decode_quantized(values: dict, params: list, dtype: torch.dtype,
                     keep: frozenset = frozenset()) -> dict:
    """Every quantised entry of `values` (a bucket's state, for the parameters `params`) but
    those named in `keep`, decoded in place to `dtype` and the parameters' shapes."""
    for name, bits, signed, scales in _pop_scales(values, keep):
        codes = values[name]
        values[name] = TensorList([
            dequantize(c, s, bits, signed, tuple(p.shape), dtype)
            for c, s, p in zip(codes.tensors, scales.tensors, params)])
    return values


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
        # (FSDP2's sharded parameters keep one code per element, shaped as the parameter)
        shape = tuple(param.shape) if distribution_of(param) is not None else (n_codes,)
        if shape == (n_codes,) and bits == 8 and isinstance(codes, torch.Tensor) and \
                distribution_of(codes) is None and tuple(codes.shape) == tuple(param.shape) and \
                tuple(codes.shape) != shape:
            # an FSDP2 state gathered whole (a full state dict) on one process: flat, padded
            codes = torch.nn.functional.pad(codes.reshape(-1), (0, n_codes - codes.numel()))
        if not isinstance(codes, torch.Tensor) or not isinstance(scales, torch.Tensor) or \
                codes.dtype != torch.uint8 or tuple(codes.shape) != shape or \
                scales.shape != (n_scales,):
            raise ValueError(f"state {name!r}: {bits}-bit codes and scales that do not fit a "
                             f"parameter of shape {tuple(param.shape)} (expected uint8 codes of "
                             f"shape {shape} and {n_scales} scales)")
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
