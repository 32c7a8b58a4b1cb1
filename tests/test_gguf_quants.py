"""ggml's block types (mlxinfer/gguf_quants.py) against the gguf package's own dequantizers, type by
type, on random blocks: bit for bit. (Loading whole K-quant files: tests/test_loading.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from mlxinfer.gguf_quants import AFFINE_BITS, TYPES, affine, dequantize, pack, to_mlx

# byte offsets of each type's float16 scales (d, and dmin / m): random bytes there could be NaN
SCALES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,)}
SCALES |= {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
SCALES |= {"IQ4_NL": (0,)}


def random_blocks(name: str, nbytes: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    for offset in SCALES.get(name, ()):
        raw[:, offset : offset + 2] = rng.normal(0, 0.1, (n, 1)).astype(np.float16).view(np.uint8)
    if name == "Q8_K":
        raw[:, :4] = rng.normal(0, 0.1, (n, 1)).astype(np.float32).view(np.uint8)
    if name in ("F32", "F16", "BF16"):  # plain numbers
        values = rng.normal(0, 1, n).astype(np.float32)
        if name == "F16":
            return values.astype(np.float16).view(np.uint8).reshape(n, 2)
        if name == "BF16":
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, 2)
        return values.view(np.uint8).reshape(n, 4)
    return raw


@pytest.mark.parametrize("chunk", [1 << 16, 64], ids=["one-pass", "block-or-two-a-pass"])
@pytest.mark.parametrize("kind", [k for k, (name, _, _) in TYPES.items() if name != "Q8_K"])
def test_every_type_equals_the_gguf_packages_dequantizer(kind, chunk, monkeypatch):
    import gguf
    from gguf.quants import dequantize as reference

    from mlxinfer import gguf_quants

    monkeypatch.setattr(gguf_quants, "CHUNK_WEIGHTS", chunk)  # passes of whole blocks

    name, block, nbytes = TYPES[kind]
    raw = random_blocks(name, nbytes, 96, seed=kind)
    expected = reference(raw.reshape(-1), gguf.GGMLQuantizationType[name]).reshape(-1)
    got = dequantize(raw, kind)
    assert got.dtype == np.float32 and got.shape == (96 * block,)
    assert np.array_equal(got, expected)
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (block, nbytes)


def test_q8_k_is_its_scale_times_its_int8_values():
    """The gguf package has no Q8_K dequantizer: ggml's definition, d (float32) x qs (int8)."""
    kind = next(k for k, t in TYPES.items() if t[0] == "Q8_K")
    raw = random_blocks("Q8_K", 292, 8)
    d = raw[:, :4].copy().view(np.float32)
    expected = (d * raw[:, 4:260].view(np.int8).astype(np.float32)).reshape(-1)
    assert np.array_equal(dequantize(raw, kind), expected)


def test_a_partial_block_is_refused():
    kind = next(k for k, t in TYPES.items() if t[0] == "Q4_K")
    with pytest.raises(ValueError, match="not a whole number of Q4_K blocks of 144"):
        dequantize(np.zeros(200, np.uint8), kind)


@pytest.mark.parametrize("kind", sorted(AFFINE_BITS))
def test_affine_groups_give_the_same_weights_through_mlx(kind):
    """The native policy's conversion: MLX's own dequantization of the packed groups equals the
    block's float32 weights bit for bit, across several passes (300 rows of 1024 weights)."""
    import mlx.core as mx

    from .test_loading import random_blocks

    type_id = next(i for i, t in TYPES.items() if t[0] == kind)
    rows, columns = 300, 1024
    raw = random_blocks(np.random.default_rng(3), kind, rows, columns)
    expected = dequantize(raw, type_id).reshape(rows, columns)
    q, scales, biases = affine(raw, type_id)
    bits = AFFINE_BITS[kind]
    assert q.max() < 2**bits
    ours = mx.dequantize(
        mx.array(pack(q.reshape(rows, columns), bits)),
        mx.array(scales.reshape(rows, -1)),
        mx.array(biases.reshape(rows, -1)),
        group_size=32,
        bits=bits,
    )
    assert np.array_equal(np.array(ours), expected)


@pytest.mark.parametrize("chunk", [1 << 17, 256], ids=["one-pass", "a-block-a-pass"])
@pytest.mark.parametrize("kind", sorted(AFFINE_BITS))
def test_to_mlx_packs_affine_types_without_loss(kind, chunk, monkeypatch):
    """The native policy's fast path (4-bit nibbles repacked as bytes, 5 bits eight values to
    five bytes) gives what `affine` and `pack` give, packed q and its scales and biases."""
    from mlxinfer import gguf_quants

    from .test_loading import random_blocks

    monkeypatch.setattr(gguf_quants, "CONVERT_WEIGHTS", chunk)
    type_id = next(i for i, t in TYPES.items() if t[0] == kind)
    rows, columns, bits = 24, 1024, AFFINE_BITS[kind]
    raw = random_blocks(np.random.default_rng(4), kind, rows, columns)
    packed, scales, biases = to_mlx(raw, type_id, bits)
    q, expected_scales, expected_biases = affine(raw, type_id)
    words = packed.view("<u4").reshape(rows, -1)
    assert np.array_equal(words, pack(q.reshape(rows, columns), bits))
    assert np.array_equal(scales, expected_scales) and np.array_equal(biases, expected_biases)


@pytest.mark.parametrize(
    "kind, bits",
    [(k, b) for k in ("Q6_K", "Q2_K", "Q3_K", "IQ4_NL") for b in (8, 4)]
    + [("Q4_K", 8), ("Q8_0", 4)],  # (at their own bits these two convert without loss)
)
def test_to_mlx_quantizes_again_exactly_as_mx_quantize(kind, bits, monkeypatch):
    """Types quantized again (and any type at other bits) are dequantized and quantized by numpy
    on the loading threads: bit for bit what mx.quantize makes of the dequantized weights, over
    several passes, with all-zero groups and a group whose edges tie in magnitude."""
    import mlx.core as mx

    from mlxinfer import gguf_quants

    from .test_loading import random_blocks

    monkeypatch.setattr(gguf_quants, "CONVERT_WEIGHTS", 1 << 12)
    type_id = next(i for i, t in TYPES.items() if t[0] == kind)
    name, block, nbytes = TYPES[type_id]
    rows, columns = 40, 1024
    raw = random_blocks(np.random.default_rng(5), kind, rows, columns).reshape(-1, nbytes)
    raw[:3] = 0  # blocks of zeros: scale 0, every weight 0
    weights = dequantize(raw, type_id).reshape(rows, columns)
    assert (weights == 0).any() and (weights != 0).any()
    packed, scales, biases = to_mlx(raw, type_id, bits)
    expected = mx.quantize(mx.array(weights), group_size=32, bits=bits)
    assert np.array_equal(packed.view("<u4").reshape(rows, -1), np.array(expected[0]))
    assert np.array_equal(scales.reshape(rows, -1), np.array(expected[1]))
    assert np.array_equal(biases.reshape(rows, -1), np.array(expected[2]))


def test_mlx_quantize_emulation_on_ties_and_constants():
    """Groups built to reach MLX's branches: |min| == |max| (the maximum is the edge), a constant
    group (q0 == 0 after the eps floor), a group of one sign; equal to mx.quantize."""
    import mlx.core as mx

    from mlxinfer.gguf_quants import _mlx_quantize

    rng = np.random.default_rng(6)
    w = rng.standard_normal((6, 32)).astype(np.float32)
    w[0, :2] = [-2.0, 2.0]
    w[0, 2:] = np.clip(w[0, 2:], -1.9, 1.9)
    w[1] = 0.25
    w[2] = np.abs(w[2]) + 1
    w[3] = -np.abs(w[3]) - 1
    w[4] = 0
    w[5, :] = 1e-9
    for bits in (8, 4):
        q, scales, biases = _mlx_quantize(w, bits)
        expected = mx.quantize(mx.array(w), group_size=32, bits=bits)
        assert np.array_equal(pack(q, bits), np.array(expected[0]))
        assert np.array_equal(scales, np.array(expected[1]).reshape(-1))
        assert np.array_equal(biases, np.array(expected[2]).reshape(-1))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_lays_values_out_as_mlx_reads_them(bits):
    """MLX's dequantize with scale 1 and bias 0 reads every packed value back, in order."""
    import mlx.core as mx

    values = np.random.default_rng(bits).integers(0, 2**bits, (4, 256))
    read = mx.dequantize(
        mx.array(pack(values, bits)), mx.ones((4, 8)), mx.zeros((4, 8)), group_size=32, bits=bits
    )
    assert np.array_equal(np.array(read), values)


@pytest.mark.parametrize("kind, worst", [("Q4_K", 0.12), ("Q6_K", 0.03)])
def test_the_tests_k_quantizer_makes_blocks_the_gguf_package_reads(kind, worst):
    """tests/tools/kquants.py (which makes the default model's K-quant files): the `gguf`
    package reads its blocks back to the weights within a 4-bit (6-bit) step: measured 0.077
    (0.019) relative on normal weights."""
    import gguf

    from .tools.kquants import quantize_q4_k, quantize_q6_k

    weights = np.random.default_rng(5).standard_normal((16, 512)).astype(np.float32) * 0.05
    weights[3, :40] = 0  # an all-zero sub-block
    raw = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}[kind](weights)
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(weights.shape)
    assert np.linalg.norm(back - weights) / np.linalg.norm(weights) < worst
    assert np.all(back[3, :32] == 0)
    assert np.array_equal(
        back,
        dequantize(raw, next(i for i, t in TYPES.items() if t[0] == kind)).reshape(weights.shape),
    )
