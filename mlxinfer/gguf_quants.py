"""ggml's block-quantized tensor types, dequantized to float32 with vectorised numpy.

`mx.load` reads F32, F16, Q4_0, Q4_1 and Q8_0; the files people download are mostly K-quants
(Q4_K_M mixes Q4_K and Q6_K), which it refuses. Each type here is a fixed-size block of bytes
holding `block` weights; a tensor's data is `n / block` blocks back to back (ggml-common.h):

    type    weights/block  bytes  layout (per block)
    Q4_0    32             18     d f16, 16 bytes of 4-bit q:            w = d (q - 8)
    Q4_1    32             20     d, m f16, 16 bytes of 4-bit q:         w = d q + m
    Q5_0    32             22     d f16, 32 high bits, 16 bytes of low:  w = d (q - 16)
    Q5_1    32             24     d, m f16, high bits, low nibbles:      w = d q + m
    Q8_0    32             34     d f16, 32 int8:                        w = d q
    Q2_K    256            84     16 scale/min nibbles, 64 bytes of 2-bit q, d, dmin f16
    Q3_K    256            110    32 bytes of high bits, 64 bytes of 2-bit q, 12 bytes of 6-bit
                                  scales, d f16:                         w = d (s - 32) (q - 4 h')
    Q4_K    256            144    d, dmin f16, 12 bytes of 6-bit scales and mins, 128 of 4-bit q
    Q5_K    256            176    d, dmin f16, scales and mins, 32 bytes of high bits, 128 of low
    Q6_K    256            210    128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d
    Q8_K    256            292    d f32, 256 int8, 16 int16 block sums (unused here)
    IQ4_NL  32             18     d f16, 16 bytes of 4-bit indices into a fixed non-linear table
    BF16    1              2      the upper half of a float32

K-quants split a block into sub-blocks of 16 or 32 weights, each with its own scale (and min), the
scales themselves quantized against the block's d (and dmin). Every function takes the raw bytes
of whole blocks and returns float32 weights in order; tests check each against the `gguf`
package's own dequantizers on random blocks.

Q4_0/1, Q5_0/1, Q8_0, Q4_K and Q5_K are MLX affine groups of 32 as they stand: `_PARTS` reads
each layout once, as (q, scale, bias), from which the float32 weights of Q4_1, Q5_1, Q4_K and
Q5_K are computed. `to_mlx` gives the native policy its MLX quantization: the 4-bit types'
nibbles repacked byte by byte, the 5- and 8-bit ones packed from their parts, and every other
type (or bit width) dequantized and quantized again as mx.quantize does it, bit for bit, in numpy
so that it runs on the loading threads.
"""

from __future__ import annotations

import numpy as np

# ggml type id -> (name, weights per block, bytes per block)
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    20: ("IQ4_NL", 32, 18),
    30: ("BF16", 1, 2),
}

CHUNK_WEIGHTS = 1 << 16  # weights dequantized a pass (256 KB of float32)
CONVERT_WEIGHTS = 1 << 17  # weights converted to MLX's quantization a pass (`to_mlx`; measured
# fastest of 2^16-2^18: numpy's per-call overhead is felt in the byte-level repacking)

IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)


def dequantize(data: np.ndarray, kind: int) -> np.ndarray:
    """The float32 weights of `data` (uint8, whole blocks of ggml type `kind`), flat."""
    name, block, nbytes = TYPES[kind]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if raw.size % nbytes:
        raise ValueError(f"{raw.size} bytes is not a whole number of {name} blocks of {nbytes}")
    blocks = raw.reshape(-1, nbytes)
    out = np.empty(len(blocks) * block, np.float32)
    step = max(1, CHUNK_WEIGHTS // block)  # blocks a pass: its temporaries stay in the cache
    with np.errstate(invalid="ignore", over="ignore"):  # (a file's NaN scale gives NaN weights)
        for start in range(0, len(blocks), step):
            part = blocks[start : start + step]
            out[start * block : (start + len(part)) * block] = _DEQUANTIZE[name](part).reshape(-1)
    return out


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """A float16 field at byte `start` of each block, as float32 `[n, 1]`."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """`[n, k]` bytes -> `[n, 2k]`: the k low nibbles, then the k high ones (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view(np.float32)


def _f16_plain(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view(np.float16).astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """Q5_0/Q5_1's 32 high bits (a little-endian uint32 at `start`), bit j for weight j, as 0/16."""
    high = blocks[:, start : start + 4].copy().view("<u4")  # [n, 1]
    return (((high >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


# The symmetric types dequantize as d (q - offset) directly (one product: Q8_0 at ~1.45x the
# speed of going through its affine parts); the others through theirs (_from_parts).
def _q4_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]).astype(np.float32) - 8)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    q = (_nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2)).astype(np.float32)
    return _f16(blocks, 0) * (q - 16)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _q8_k(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :4].copy().view(np.float32)
    return d * blocks[:, 4:260].view(np.int8).astype(np.float32)


def _iq4_nl(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * IQ4_NL_VALUES[_nibbles(blocks[:, 2:])]


def _two_bits(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 64 bytes of 2-bit values -> `[n, 256]` in ggml's order: for each half of 32
    bytes, the 4 bit pairs (shifts 0, 2, 4, 6) in turn, each over the half's 32 bytes."""
    halves = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((halves >> shifts) & 3).reshape(-1, 256)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    scales = blocks[:, :16]  # one byte per 16 weights: low nibble scale, high nibble min
    q = _two_bits(blocks[:, 16:80]).astype(np.float32).reshape(-1, 16, 16)
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    scale = (d * (scales & 0x0F)).reshape(-1, 16, 1)
    low = (dmin * (scales >> 4)).reshape(-1, 16, 1)
    return (scale * q - low).reshape(-1, 256)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K's 16 6-bit scales from 12 bytes: the low 4 bits of scales 0-7 in bytes 0-7's low
    nibbles and of 8-15 in their high nibbles, the top 2 bits of all 16 in bytes 8-11."""
    low = np.concatenate([packed[:, :8] & 0x0F, packed[:, :8] >> 4], axis=1)  # [n, 16]
    top = packed[:, 8:12]  # scale i's top bits: byte 8 + i % 4, bits 2 * (i // 4)
    index = np.arange(16)
    high = (top[:, index % 4] >> (2 * (index // 4)).astype(np.uint8)) & 3
    return (low | (high << 4)).astype(np.int8).astype(np.float32) - 32


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    hmask = blocks[:, :32]  # bit k of byte l: weight l (+16 ...) of the k-th group of 32
    q = _two_bits(blocks[:, 32:96]).astype(np.float32)  # [n, 256]
    scales = _q3_k_scales(blocks[:, 96:108])  # [n, 16]
    d = _f16(blocks, 108)
    # weight w = 128 * half + 32 * pair + l (l < 32): its high bit is bit (4 * half + pair) of
    # hmask[l]; without it the value is 4 less
    bit = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = ((hmask.reshape(-1, 1, 32) >> bit) & 1).reshape(-1, 256).astype(np.float32)
    q = q - 4 * (1 - high)
    return ((d * scales).reshape(-1, 16, 1) * q.reshape(-1, 16, 16)).reshape(-1, 256)


def _k4_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 8 6-bit scales and 8 6-bit mins from 12 bytes (ggml's get_scale_min_k4): for
    sub-blocks 0-3 the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); for 4-7 the nibbles of
    bytes 8-11 with the top 2 bits of bytes 0-3 (scales) and 4-7 (mins)."""
    first_scale, first_min = packed[:, 0:4] & 63, packed[:, 4:8] & 63
    last_scale = (packed[:, 8:12] & 0x0F) | ((packed[:, 0:4] >> 6) << 4)
    last_min = (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)
    scales = np.concatenate([first_scale, last_scale], axis=1).astype(np.float32)
    mins = np.concatenate([first_min, last_min], axis=1).astype(np.float32)
    return scales, mins


def _k4_values(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes of nibbles -> `[n, 256]`: each 32 bytes give 32 low nibbles then
    32 high ones (sub-blocks 2i and 2i + 1)."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 256)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # [half, which 32 bytes, l]
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # [half, -, l]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # one per 16 weights
    d = _f16(blocks, 208)
    # within a half of 128: weights 0-31 low nibbles of ql[0:32] with qh bits 0-1, 32-63 low
    # nibbles of ql[32:64] with bits 2-3, 64-95 high nibbles of ql[0:32] with bits 4-5, 96-127
    # high nibbles of ql[32:64] with bits 6-7
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, 4, 32]
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = (low | (((qh >> shifts) & 3) << 4)).astype(np.float32) - 32
    return ((d * scales).reshape(-1, 16, 1) * q.reshape(-1, 16, 16)).reshape(-1, 256)


# -- the types that are affine groups of 32 ----------------------------------------------------

AFFINE_GROUP = 32


def _scales_q4_0(blocks):
    d = _f16(blocks, 0)
    return d, -8 * d


def _scales_q4_1(blocks):
    return _f16(blocks, 0), _f16(blocks, 2)


def _scales_q4_k(blocks):
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k4_scales(blocks[:, 4:16])
    return d * scales, -(dmin * mins)


def _parts_q4_0(blocks):
    return _nibbles(blocks[:, 2:]), *_scales_q4_0(blocks)


def _parts_q4_1(blocks):
    return _nibbles(blocks[:, 4:]), *_scales_q4_1(blocks)


def _parts_q5_0(blocks):
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2), d, -16 * d


def _parts_q5_1(blocks):
    return _nibbles(blocks[:, 8:]) | _fifth_bits(blocks, 4), _f16(blocks, 0), _f16(blocks, 2)


def _parts_q8_0(blocks):
    d = _f16(blocks, 0)
    q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128 * d


def _parts_q4_k(blocks):
    return _k4_values(blocks[:, 16:144]), *_scales_q4_k(blocks)


def _parts_q5_k(blocks):
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k4_scales(blocks[:, 4:16])
    qh = blocks[:, 16:48]  # bit j of byte l: the fifth bit of weight 32 j + l
    q = _k4_values(blocks[:, 48:176]).reshape(-1, 8, 32)
    bit = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = q | (((qh.reshape(-1, 1, 32) >> bit) & 1) << 4)
    return q.reshape(-1, 256), d * scales, -(dmin * mins)


_SCALES = {"Q4_0": _scales_q4_0, "Q4_1": _scales_q4_1, "Q4_K": _scales_q4_k}  # (scale, bias)

_PARTS = {  # type -> its blocks as (q, scale, bias) of each group of 32
    "Q4_0": _parts_q4_0,
    "Q4_1": _parts_q4_1,
    "Q5_0": _parts_q5_0,
    "Q5_1": _parts_q5_1,
    "Q8_0": _parts_q8_0,
    "Q4_K": _parts_q4_k,
    "Q5_K": _parts_q5_k,
}


def _from_parts(parts):
    """The float32 dequantizer of a type whose blocks are affine groups of 32 (`_PARTS`):
    w = scale * q + bias, ggml's own formula for these (Q4_K's d sc q - dmin m)."""

    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        q, scales, biases = parts(blocks)
        n = len(blocks)
        q = q.reshape(n, -1, AFFINE_GROUP).astype(np.float32)
        return (scales.reshape(n, -1, 1) * q + biases.reshape(n, -1, 1)).reshape(n, -1)

    return dequantize_blocks


_DEQUANTIZE = {
    "F32": _f32,
    "F16": _f16_plain,
    "BF16": _bf16,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q6_K": _q6_k,
    "Q8_K": _q8_k,
    "IQ4_NL": _iq4_nl,
    "Q4_0": _q4_0,
    "Q5_0": _q5_0,
    "Q8_0": _q8_0,
    **{name: _from_parts(_PARTS[name]) for name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K")},
}


# -- as MLX affine quantization -----------------------------------------------------------------

# Types whose blocks are MLX affine groups of 32 as they stand, w = scale * q + bias with q
# unsigned (int8 q offset by 128): -> the MLX bits of their q.
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}

# The 4-bit types' nibbles, already packed two to a byte but in ggml's order (each run of bytes
# holds one run of weights in its low nibbles, the next in its high ones): (first byte, last
# byte, run), so `_mlx_nibbles` repacks the bytes without unpacking them.
_NIBBLE_BYTES = {"Q4_0": (2, 18, 16), "Q4_1": (4, 20, 16), "Q4_K": (16, 144, 32)}


def affine(data: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocks of `data` (ggml type `kind`, one of AFFINE_BITS) as MLX affine groups of 32,
    without loss: (q uint8 `[n]`, scales float32 `[n / 32]`, biases float32 `[n / 32]`), with
    scale * q + bias the weights `dequantize` gives (scales and biases are products of a float16
    and a small integer: exact in float32)."""
    name, block, _ = TYPES[kind]
    return _by_chunks(data, kind, block, _PARTS[name], CHUNK_WEIGHTS)


def to_mlx(data: np.ndarray, kind: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocks of `data` (ggml type `kind`) as MLX affine groups of 32 at `bits`: (packed
    uint8 `[n * bits / 8]`, the bytes of MLX's uint32 words; scales and biases float32
    `[n / 32]`). A type of AFFINE_BITS at its own bits converts without loss; any other is
    dequantized and quantized again exactly as `mx.quantize` does it (`_mlx_quantize`), a pass of
    CONVERT_WEIGHTS at a time on this thread (numpy, so a thread per tensor runs in parallel,
    where mx.quantize would run on MLX's one stream)."""
    name, block, _ = TYPES[kind]
    if AFFINE_BITS.get(name) == bits and name in _NIBBLE_BYTES:
        first, last, run = _NIBBLE_BYTES[name]
        scales = _SCALES[name]

        def convert(part: np.ndarray):
            return (_mlx_nibbles(part[:, first:last], run), *scales(part))
    elif AFFINE_BITS.get(name) == bits:

        def convert(part: np.ndarray):
            q, part_scales, part_biases = _PARTS[name](part)
            return _pack_bytes(q.reshape(-1), bits), part_scales, part_biases
    else:

        def convert(part: np.ndarray):
            w = _DEQUANTIZE[name](part).reshape(-1, AFFINE_GROUP)
            q, part_scales, part_biases = _mlx_quantize(w, bits)
            return _pack_bytes(q.reshape(-1), bits), part_scales, part_biases

    return _by_chunks(data, kind, block * bits // 8, convert, CONVERT_WEIGHTS)


def _by_chunks(data: np.ndarray, kind: int, first_width: int, convert, weights: int):
    """`convert` over the blocks of `data` a pass of `weights` weights at a time, its three
    results (first: `first_width` values a block; then one scale and bias a group of 32)
    written into flat arrays."""
    name, block, nbytes = TYPES[kind]
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, nbytes)
    groups = block // AFFINE_GROUP  # groups of 32 a block
    first = np.empty(len(blocks) * first_width, np.uint8)
    scales = np.empty(len(blocks) * groups, np.float32)
    biases = np.empty(len(blocks) * groups, np.float32)
    step = max(1, weights // block)  # blocks a pass
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for start in range(0, len(blocks), step):
            part_first, part_scales, part_biases = convert(blocks[start : start + step])
            end = min(start + step, len(blocks))
            first[start * first_width : end * first_width] = part_first.reshape(-1)
            scales[start * groups : end * groups] = part_scales.reshape(-1)
            biases[start * groups : end * groups] = part_biases.reshape(-1)
    return first, scales, biases


def _mlx_nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """ggml's packed nibbles (each `run` bytes: weights 0..run-1 in the low nibbles, run..2run-1
    in the high ones) -> MLX's (byte k: weight 2k low, 2k + 1 high), as bytes, never unpacked."""
    chunks = qs.reshape(-1, run)
    even, odd = chunks[:, 0::2], chunks[:, 1::2]
    low = (even & 0x0F) | (odd << 4)  # weights 0..run-1 (uint8 shifts drop the high bits)
    high = (even >> 4) | (odd & 0xF0)  # weights run..2run-1
    return np.concatenate([low, high], axis=1)


def _mlx_quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX's affine quantization of groups `w` (float32 `[g, 32]`), step for step as its CPU
    backend computes it (mlx/backend/cpu/quantized.cpp, in float32): the edge of larger
    magnitude is represented exactly, the scale spans max - min in 2^bits - 1 steps.
    -> (q uint8 `[g, 32]`, scales `[g]`, biases `[g]`); the tests hold it equal to
    mx.quantize bit for bit."""
    n_bins = np.float32((1 << bits) - 1)
    columns = np.ascontiguousarray(w.T)  # [32, g]: the group reductions run along rows
    w_max, w_min = columns.max(axis=0), columns.min(axis=0)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scale)
    nonzero = q0 != 0
    scale = np.where(nonzero, edge / np.where(nonzero, q0, 1), scale)
    bias = np.where(nonzero, edge, np.float32(0))
    q = np.subtract(w, bias[:, None], out=columns.reshape(w.shape))  # (a buffer reused)
    np.divide(q, scale[:, None], out=q)
    np.rint(q, out=q)
    np.clip(q, 0, n_bins, out=q)
    return q.astype(np.uint8), scale, bias


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit values (2 to 8), rows of `[..., k]` (k * bits a multiple of 32), packed
    as MLX packs them: a little-endian stream of bits, the first value in the lowest ones, read
    as uint32 words."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    shape = q.shape[:-1]
    return _pack_bytes(q.reshape(-1), bits).view("<u4").reshape(*shape, -1).astype(np.uint32)


def _pack_bytes(q: np.ndarray, bits: int) -> np.ndarray:
    """The bytes of `pack`: 8 bits are the values; 4, nibble pairs; 5, eight values in five
    bytes (uint8 arithmetic: shifts drop what spills into the next byte); other widths eight
    values at a time through a uint64, a pass of CHUNK_WEIGHTS values at once."""
    if bits == 8:
        return q
    if bits == 4:
        return q[0::2] | (q[1::2] << 4)
    v = q.reshape(-1, 8)
    if bits == 5:
        out = np.empty((len(v), 5), np.uint8)
        out[:, 0] = v[:, 0] | (v[:, 1] << 5)
        out[:, 1] = (v[:, 1] >> 3) | (v[:, 2] << 2) | (v[:, 3] << 7)
        out[:, 2] = (v[:, 3] >> 1) | (v[:, 4] << 4)
        out[:, 3] = (v[:, 4] >> 4) | (v[:, 5] << 1) | (v[:, 6] << 6)
        out[:, 4] = (v[:, 6] >> 2) | (v[:, 7] << 3)
        return out.reshape(-1)
    out = np.empty((len(v), bits), np.uint8)
    shifts = (bits * np.arange(8, dtype=np.uint64)).astype(np.uint64)
    step = max(1, CHUNK_WEIGHTS // 8)
    for start in range(0, len(v), step):
        part = v[start : start + step].astype(np.uint64) << shifts
        words = np.bitwise_or.reduce(part, axis=-1).astype("<u8")  # 8 * bits bits each
        out[start : start + step] = words.view(np.uint8).reshape(-1, 8)[:, :bits]
    return out.reshape(-1)
