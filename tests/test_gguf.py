"""mlxinfer/gguf.py: the metadata -> config table, tensor names, our own bounded GGUF header reader,
and the errors crafted or damaged GGUF files must give (fuzzed: random bytes, truncations, bit
flips) — a ModelLoadError naming the file, never another exception, a crash or a large
allocation."""

from __future__ import annotations

import resource
import struct
import time

import mlx.core as mx
import numpy as np
import pytest

import mlxinfer
from mlxinfer import ModelLoadError, gguf

TINY = dict(hidden=64, ffn=128, heads=4, kv_heads=2, vocab=128, layers=2, context=256)


def write_tiny_gguf(path, qtype: str = "Q8_0", arch: str = "llama", seed: int = 0) -> None:
    """A small loadable GGUF written with llama.cpp's `gguf` package: random weights, matrices in
    `qtype`, norms in F32, a byte-level BPE vocabulary of single characters."""
    import gguf as gguf_py

    t = TINY
    head_dim = t["hidden"] // t["heads"]
    writer = gguf_py.GGUFWriter(str(path), arch)
    writer.add_context_length(t["context"])
    writer.add_embedding_length(t["hidden"])
    writer.add_block_count(t["layers"])
    writer.add_feed_forward_length(t["ffn"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(t["vocab"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([chr(c) for c in range(33, 33 + t["vocab"])])
    writer.add_token_types([1] * t["vocab"])
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(seed)
    kind = gguf_py.GGMLQuantizationType[qtype]

    def add(name, *shape):
        w = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if len(shape) == 1 or qtype == "F32":
            writer.add_tensor(name, w)
        elif qtype == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf_py.quants.quantize(w, kind), raw_dtype=kind)

    q_out, kv_out = t["heads"] * head_dim, t["kv_heads"] * head_dim
    add("token_embd.weight", t["vocab"], t["hidden"])
    for i in range(t["layers"]):
        add(f"blk.{i}.attn_norm.weight", t["hidden"])
        add(f"blk.{i}.attn_q.weight", q_out, t["hidden"])
        add(f"blk.{i}.attn_k.weight", kv_out, t["hidden"])
        add(f"blk.{i}.attn_v.weight", kv_out, t["hidden"])
        add(f"blk.{i}.attn_output.weight", t["hidden"], q_out)
        add(f"blk.{i}.ffn_norm.weight", t["hidden"])
        add(f"blk.{i}.ffn_gate.weight", t["ffn"], t["hidden"])
        add(f"blk.{i}.ffn_up.weight", t["ffn"], t["hidden"])
        add(f"blk.{i}.ffn_down.weight", t["hidden"], t["ffn"])
    add("output_norm.weight", t["hidden"])
    add("output.weight", t["vocab"], t["hidden"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def write_tiny_gemma_k_gguf(path, seed: int = 0) -> None:
    """A small Gemma 3 GGUF as llama.cpp writes one: Q4_K and Q6_K matrices (read by our own
    reader), norms in F32 around attention and the MLP, and a SentencePiece ("llama") vocabulary
    of control tokens, byte tokens and "▁"-words, with no merges."""
    import gguf as gguf_py

    from .test_loading import random_blocks

    hidden, ffn, heads, kv_heads, head_dim, layers = 256, 256, 4, 2, 64, 2
    writer = gguf_py.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(8)
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = control + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["\u2581", "\u2581a", "\u2581ab", "a", "b", "ab", "  "] + [
        chr(c) for c in range(99, 123)
    ]
    types = [3] * len(control) + [6] * 256 + [1] * (len(tokens) - len(control) - 256)
    types[control.index("<unk>")] = 2
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    rng = np.random.default_rng(seed)
    kinds = ["Q4_K", "Q6_K"]

    def matrix(name, rows, columns):
        kind = kinds[len(writer.tensors[0]) % 2] if writer.tensors else kinds[0]
        raw = random_blocks(rng, kind, rows, columns)
        writer.add_tensor(name, raw, raw_dtype=gguf_py.GGMLQuantizationType[kind])

    def norm(name, size):
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        for part in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(f"blk.{i}.{part}.weight", hidden)
        norm(f"blk.{i}.attn_q_norm.weight", head_dim)
        norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gemma_k_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-k") / "tiny-gemma-k.gguf"
    write_tiny_gemma_k_gguf(path)
    return path


def test_tiny_gemma_k_quant_gguf_loads_and_tokenizes(tiny_gemma_k_gguf):
    """The file the K-quant fuzz damages: it loads through our reader, and its SentencePiece
    vocabulary tokenizes with the merges its token order implies and byte fallback."""
    model, tokenizer = mlxinfer.load(tiny_gemma_k_gguf)
    assert model.config.model_type == "gemma3_text" and model.config.gemma_norms
    assert model.config.layer_windows == [8, 8]  # five in six slide: both of two layers
    ids = tokenizer.encode("ab  ab€")
    pieces = [tokenizer.id_to_token(i) for i in ids]
    # merges by the merged token's place: "▁a" before "▁ab" before "ab" before "▁▁" (the
    # stored "  "), so the second run of spaces ends up split as "▁" + "▁ab"
    assert pieces == ["<bos>", "ab", "\u2581", "\u2581ab", "<0xE2>", "<0x82>", "<0xAC>"]
    assert tokenizer.decode(ids[1:]) == "ab  ab€"
    assert tokenizer.token_to_id("<end_of_turn>") in tokenizer.eos_token_ids
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), 6 + 256 + 7 + 24) and mx.isfinite(logits).all()


# -- fuzzing ------------------------------------------------------------------------------------


def _header_end(path) -> int:
    """Where the tensor data of a well-formed GGUF starts (gguf-py's own reader says)."""
    import gguf as gguf_py

    return int(gguf_py.GGUFReader(path).data_offset)


def random_files(n: int = 200, seed: int = 0):
    """b"GGUF" + random bytes, every other file with version 3 (then random counts follow)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        body = bytearray(rng.bytes(int(rng.integers(4, 1997))))
        if i % 2 == 0:
            body[:4] = struct.pack("<I", 3)
        yield f"random-{i}", b"GGUF" + bytes(body)


def truncations(path, n: int = 150, seed: int = 1):
    """The file cut at every offset of its fixed header and at n random offsets, most of them in
    the metadata and tensor-info part, some in the tensor data."""
    rng = np.random.default_rng(seed)
    data, end = path.read_bytes(), _header_end(path)
    offsets = set(range(0, 41))
    offsets.update(int(x) for x in rng.integers(41, end, size=n * 4 // 5))
    offsets.update(int(x) for x in rng.integers(end, len(data), size=n // 5))
    for cut in sorted(offsets):
        yield f"cut-{cut}", data[:cut]


def _flip_targets(path) -> set[int]:
    """Byte offsets worth flipping every bit of: the 24-byte fixed header, every scalar metadata
    value (sizes, counts, ids: a flip makes them huge or zero) and the dimensions, type and data
    offset of three tensor infos (a float, a quantized and the last one)."""
    import gguf as gguf_py

    reader = gguf_py.GGUFReader(path)
    targets = set(range(24))
    for field in reader.fields.values():
        kinds = field.types
        if (
            field.name.startswith("GGUF.")
            or len(kinds) != 1
            or kinds[0].name in ("STRING", "ARRAY")
        ):
            continue
        end = field.offset + sum(part.nbytes for part in field.parts)
        targets.update(range(end - field.parts[-1].nbytes, end))
    tensors = reader.tensors
    for tensor in (tensors[1], tensors[2], tensors[-1]):
        parts = tensor.field.parts  # name length, name, dimension count, dims, type, offset
        start = tensor.field.offset + parts[0].nbytes + parts[1].nbytes
        targets.update(range(start, tensor.field.offset + sum(part.nbytes for part in parts)))
    return targets


def bit_flips(path, n: int = 300, seed: int = 2):
    """Single bit flips: every bit of `_flip_targets`, and n random bits of the metadata and
    tensor infos."""
    rng = np.random.default_rng(seed)
    data, end = path.read_bytes(), _header_end(path)
    bits = {byte * 8 + bit for byte in _flip_targets(path) for bit in range(8)}
    bits.update(int(x) for x in rng.integers(24 * 8, end * 8, size=n))
    for bit in sorted(bits):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        yield f"flip-{bit // 8}.{bit % 8}", bytes(flipped)


def fuzz_family(name: str, tiny, default_path):
    if name == "random":
        return random_files()
    if name == "truncated":
        return truncations(tiny)
    if name == "k-quant-truncated":
        return truncations(tiny, n=100)
    if name == "k-quant-bit-flips":
        return bit_flips(tiny, n=150)
    if name == "default-model-truncated":
        # The default model cut inside its 1.8 MB of metadata (vocabulary, merges) and tensor infos.
        with open(default_path, "rb") as f:
            head = f.read(_header_end(default_path) + 4096)
        cuts = (24, 100, 5_000, 200_000, 1_000_000, 1_500_000, len(head) - 4097, len(head) - 1)
        return ((f"default-cut-{cut}", head[:cut]) for cut in cuts)
    return bit_flips(tiny)


def load_outcome(path) -> str:
    """'ok', or 'ModelLoadError', or a description of anything else (a bug)."""
    try:
        mlxinfer.load(path)
    except ModelLoadError as e:
        if str(path) not in str(e):
            return f"ModelLoadError without the file name: {e}"
        return "ModelLoadError"
    except Exception as e:  # noqa: BLE001 - every other exception type is the failure reported
        return f"{type(e).__name__}: {e}"
    return "ok"


@pytest.mark.parametrize(
    "family",
    [
        "random",
        "truncated",
        "default-model-truncated",
        "bit-flips",
        "k-quant-truncated",
        "k-quant-bit-flips",
    ],
)
def test_fuzzed_gguf_files_raise_model_load_error(tiny_gguf, tiny_gemma_k_gguf, tmp_path, family):
    """Every damaged file gives a ModelLoadError naming it (a harmless bit flip may load), fast
    and without large allocations: random bytes after b"GGUF" (half with version 3), truncations
    at every offset of the fixed header and at random ones, single bit flips of the header,
    every scalar value and three tensor infos; of a Q8_0 llama file and of a K-quant Gemma 3
    one (our own reader, its SentencePiece vocabulary)."""
    path = tmp_path / "fuzz.gguf"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    outcomes, failures = {}, []
    tiny = tiny_gemma_k_gguf if family.startswith("k-quant") else tiny_gguf
    for label, data in fuzz_family(family, tiny, mlxinfer.default_model_path()):
        path.write_bytes(data)
        outcome = load_outcome(path)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome not in ("ok", "ModelLoadError"):
            failures.append(f"{label}: {outcome[:200]}")
    elapsed = time.perf_counter() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert not failures, f"{len(failures)} of {sum(outcomes.values())}:\n" + "\n".join(failures)
    assert outcomes.get("ModelLoadError", 0) > 0
    if not family.endswith("bit-flips"):
        assert "ok" not in outcomes
    assert elapsed < 30, f"{sum(outcomes.values())} files took {elapsed:.1f} s"
    assert grown_mb < 200


# -- crafted files ------------------------------------------------------------------------------

U8, U32, F32, STRING, ARRAY, F64 = 0, 4, 6, 8, 9, 12


def gstr(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def raw_gguf(kvs=(), tensors=(), data=b"", version=3, counts=None, align=32) -> bytes:
    """GGUF bytes put together by hand, for files the gguf package would not write. `kvs`:
    (key, value type, value bytes); `tensors`: (name, dims, ggml type, data offset)."""
    n_tensors, n_kv = counts or (len(tensors), len(kvs))
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv))
    for key, kind, value in kvs:
        out += gstr(key) + struct.pack("<I", kind) + value
    for name, dims, kind, offset in tensors:
        out += gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)
    out += bytes(-len(out) % align)
    return bytes(out + data)


def nested_array(depth: int) -> bytes:
    """An array value `depth` arrays deep, the innermost an empty uint8 array."""
    value = struct.pack("<IQ", U8, 0)
    for _ in range(depth - 1):
        value = struct.pack("<IQ", ARRAY, 1) + value
    return value


ARCH = [("general.architecture", STRING, gstr("llama"))]
EMBD = [("token_embd.weight", (8, 4), 0, 0)]  # F32 [4, 8]: 128 bytes of data


def write(tmp_path, data: bytes, name: str = "crafted.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_deeply_nested_array_is_an_error_naming_file_and_key(tmp_path):
    """Nesting used to recurse without bound: RecursionError."""
    path = write(tmp_path, raw_gguf(ARCH + [("deep.key", ARRAY, nested_array(5000))], EMBD))
    with pytest.raises(ModelLoadError, match=r"crafted\.gguf: .*'deep\.key'.*nested more than 8"):
        mlxinfer.load(path)


def test_nesting_limit_is_eight_arrays(tmp_path):
    path = write(tmp_path, raw_gguf([("ok", ARRAY, nested_array(8))]))
    assert gguf.read_header(path).metadata["ok"] == [[[[[[[[]]]]]]]]
    path = write(tmp_path, raw_gguf([("too.deep", ARRAY, nested_array(9))]))
    with pytest.raises(ModelLoadError, match=r"'too\.deep'.*nested more than 8"):
        gguf.read_header(path)


@pytest.mark.parametrize(
    "value, what",
    [
        (struct.pack("<IQ", U8, 2**60), "array of 1152921504606846976 uint8"),
        (struct.pack("<IQ", U32, 2**62), "array of 4611686018427387904 uint32"),
        (struct.pack("<IQ", STRING, 2**60), "array of 1152921504606846976 string"),
        (struct.pack("<IQ", ARRAY, 2**60), "array of 1152921504606846976 array"),
        (struct.pack("<IQ", STRING, 1) + struct.pack("<Q", 2**60), "string of 1152921504606846976"),
    ],
    ids=["uint8-array", "uint32-array", "string-array", "array-array", "string-in-array"],
)
def test_length_larger_than_file_fails_fast_naming_key(tmp_path, value, what):
    path = write(tmp_path, raw_gguf(ARCH + [("big.key", ARRAY, value + bytes(64))], EMBD))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=rf"crafted\.gguf: .*'big\.key'.*{what}"):
        mlxinfer.load(path)
    assert time.perf_counter() - start < 1


def test_string_longer_than_file_names_key(tmp_path):
    value = struct.pack("<Q", 2**63 + 5) + b"abc"
    path = write(tmp_path, raw_gguf(ARCH + [("general.name", STRING, value)], EMBD))
    with pytest.raises(ModelLoadError, match=r"crafted\.gguf: .*'general\.name'.*string of"):
        mlxinfer.load(path)


@pytest.mark.parametrize(
    "data, message",
    [
        (
            b"GGUF" + struct.pack("<IQ", 3, 2**63) + bytes(100),
            "0 metadata entries and 9223372036854775808 tensors",
        ),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40) + bytes(100), "1099511627776 metadata entries"),
        (b"GGUF" + struct.pack("<IQQQ", 3, 1, 0, 2**63) + bytes(64), "tensor info 0 of 1: name"),
        (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63) + bytes(64), "metadata entry 0 of 1: key"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 0), None),
        (b"", "bad magic"),
        (b"GGUF\x03\x00\x00", "truncated or corrupt GGUF header"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1 is not supported"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "version 50331648 \\(a big-endian file\\)"),
    ],
    ids=[
        "tensor-count",
        "kv-count",
        "tensor-name",
        "key",
        "empty",
        "empty-file",
        "short",
        "v1",
        "big-endian",
    ],
)
def test_header_counts_and_lengths_are_checked(tmp_path, data, message):
    """Counts and lengths larger than the file used to reach struct/mmap as huge ints:
    OverflowError ("Python int too large to convert to C ssize_t"); an empty file: ValueError."""
    path = write(tmp_path, data)
    if message is None:  # a well-formed file with nothing in it: the metadata lacks everything
        message = "architecture None is not supported"
    with pytest.raises(ModelLoadError, match=rf"crafted\.gguf: .*{message}"):
        mlxinfer.load(path)


# Files well-formed enough that MLX's own GGUF reader (gguflib) crashes the process on them: they
# must be refused by our reader first. Run in a child process so that a regression is a failed
# test, not a crashed test session.
MLX_CRASHERS = {
    # MLX reads a float64 as a float32 and loses its place in the file: SIGSEGV.
    "float64-value": raw_gguf(ARCH + [("x", F64, struct.pack("<d", 1.5))], EMBD, bytes(128)),
    "float64-array": raw_gguf(
        ARCH + [("x", ARRAY, struct.pack("<IQdd", F64, 2, 1.0, 2.0))], EMBD, bytes(128)
    ),
    # gguflib divides by the alignment: SIGFPE.
    "alignment-0": raw_gguf(
        ARCH + [("general.alignment", U32, struct.pack("<I", 0))], EMBD, bytes(128)
    ),
    # gguflib asserts at most 8 dimensions: SIGABRT.
    "9-dimensions": raw_gguf(ARCH, [("token_embd.weight", (1,) * 9, 0, 0)], bytes(128)),
    # A key or tensor name longer than the file: gguflib reads past the mapping, SIGSEGV.
    "key-length": b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**40) + bytes(64),
    "tensor-name-length": b"GGUF" + struct.pack("<IQQQ", 3, 1, 0, 2**40) + bytes(64),
}
MLX_CRASHER_ERRORS = {
    "float64-value": "'x' holds float64 values",
    "float64-array": "'x' holds float64 values",
    "alignment-0": "'general.alignment' is 0, not a power of two",
    "9-dimensions": "tensor 'token_embd.weight' has 9 dimensions",
    "key-length": "metadata entry 0 of 1: key",
    "tensor-name-length": "tensor info 0 of 1: name",
}


def test_files_that_crash_mlx_reader_are_refused_first(tmp_path):
    import subprocess
    import sys

    for name, data in MLX_CRASHERS.items():
        write(tmp_path, data, f"{name}.gguf")
    script = (
        "import sys, mlxinfer\n"
        "for path in sys.argv[1:]:\n"
        "    print(path, flush=True)\n"
        "    try:\n"
        "        mlxinfer.load(path)\n"
        "        print('LOADED', flush=True)\n"
        "    except mlxinfer.ModelLoadError as e:\n"
        "        print('ERROR', str(e).replace(chr(10), ' '), flush=True)\n"
    )
    paths = [str(tmp_path / f"{name}.gguf") for name in MLX_CRASHERS]
    run = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120
    )
    lines = run.stdout.splitlines()
    assert run.returncode == 0, f"crashed ({run.returncode}) after {lines[-1:]}: {run.stderr}"
    results = dict(zip(lines[::2], lines[1::2], strict=True))
    for name in MLX_CRASHERS:
        path = str(tmp_path / f"{name}.gguf")
        assert results[path].startswith(f"ERROR {path}: "), results[path]
        assert MLX_CRASHER_ERRORS[name] in results[path]


def test_tensor_info_checks(tmp_path):
    cases = {
        "misaligned": ([("token_embd.weight", (8, 4), 0, 8)], "data offset 8 is not a multiple"),
        "no-dims": ([("token_embd.weight", (), 0, 0)], "has 0 dimensions"),
        "huge-dim": ([("token_embd.weight", (2**32, 2**32), 0, 0)], "larger than 2147483647"),
        "duplicate": (EMBD * 2, "tensor 'token_embd.weight' appears twice"),
        "past-end": ([("token_embd.weight", (8, 8), 0, 0)], "extends past the end of the file"),
        "q8-row": ([("token_embd.weight", (40, 4), 8, 0)], "rows of 40 values, not a multiple"),
    }
    for name, (tensors, message) in cases.items():
        path = write(tmp_path, raw_gguf(ARCH, tensors, bytes(256 if name == "q8-row" else 128)))
        with pytest.raises(ModelLoadError, match=rf"crafted\.gguf: .*{message}"):
            gguf.check_tensor_types(path)
    dup = raw_gguf(ARCH * 2, EMBD, bytes(128))
    with pytest.raises(ModelLoadError, match="'general.architecture' appears twice"):
        gguf.check_tensor_types(write(tmp_path, dup))
    bad = raw_gguf(ARCH + [("general.alignment", F32, struct.pack("<f", 32))], EMBD, bytes(128))
    with pytest.raises(ModelLoadError, match="'general.alignment' is not a uint32"):
        gguf.check_tensor_types(write(tmp_path, bad))
    utf8 = raw_gguf(ARCH + [("name", STRING, gstr(b"\xff\xfe"))], EMBD, bytes(128))
    with pytest.raises(ModelLoadError, match="'name': string is not valid UTF-8"):
        gguf.check_tensor_types(write(tmp_path, utf8))


def test_metadata_inconsistent_with_tensors_fails_before_building_a_model(tiny_gguf, tmp_path):
    """A corrupt size would otherwise build the model it describes: a block_count of 2**31 took
    minutes and all memory; a wrong embedding_length reached MLX's quantize (ValueError)."""
    import gguf as gguf_py

    reader = gguf_py.GGUFReader(tiny_gguf)
    for key, value, message in [
        (
            "llama.block_count",
            2**31 - 1,
            r"gives 2147483647 layers \(block_count\), but its "
            r"tensors hold layers 0 to 1",
        ),
        (
            "llama.embedding_length",
            96,
            r"'token_embd\.weight' has shape \(128, 64\), expected "
            r"\(128, 96\)",
        ),
        ("llama.attention.head_count", 0, r"'llama\.attention\.head_count' is 0, not a positive"),
        ("llama.rope.freq_base", float("nan"), r"'llama\.rope\.freq_base' is nan, not a finite"),
    ]:
        field = reader.fields[key]
        data = bytearray(tiny_gguf.read_bytes())
        end = field.offset + sum(part.nbytes for part in field.parts)
        old = field.parts[-1]
        data[end - old.nbytes : end] = np.array([value], dtype=old.dtype).tobytes()
        path = write(tmp_path, bytes(data))
        start = time.perf_counter()
        with pytest.raises(ModelLoadError, match=rf"crafted\.gguf: .*{message}"):
            mlxinfer.load(path)
        assert time.perf_counter() - start < 2


# -- the reader: values, types, tensor infos ------------------------------------------------------


def test_reader_returns_every_value_type(tmp_path):
    """A file written by the gguf package with each value type, nested arrays included: our
    reader gives Python values, and the same as MLX's reader where MLX reads the type."""
    import gguf as gguf_py

    T = gguf_py.GGUFValueType
    path = tmp_path / "values.gguf"
    writer = gguf_py.GGUFWriter(str(path), "llama")
    values = {
        "t.uint8": (200, T.UINT8),
        "t.int8": (-100, T.INT8),
        "t.uint16": (60000, T.UINT16),
        "t.int16": (-30000, T.INT16),
        "t.uint32": (4_000_000_000, T.UINT32),
        "t.int32": (-2_000_000_000, T.INT32),
        "t.float32": (0.25, T.FLOAT32),
        "t.bool": (True, T.BOOL),
        "t.string": ("héllo ✓", T.STRING),
        "t.uint64": (2**64 - 1, T.UINT64),
        "t.int64": (-(2**63), T.INT64),
        "t.float64": (1e300, T.FLOAT64),
    }
    for key, (value, kind) in values.items():
        writer.add_key_value(key, value, kind)
    arrays = {
        "a.int32": ([1, -2, 3], T.INT32),
        "a.float32": ([0.5, -1.5], T.FLOAT32),
        "a.bool": ([True, False, True], T.BOOL),
        "a.string": (["a", "", "ü"], T.STRING),
        "a.uint64": ([0, 2**64 - 1], T.UINT64),
        "a.float64": ([1e-300, 2.0], T.FLOAT64),
    }
    for key, (value, kind) in arrays.items():
        writer.add_key_value(key, value, T.ARRAY, sub_type=kind)
    writer.add_array("a.nested", [[1, 2], [3], [4, 5, 6]])
    writer.add_array("a.nested_strings", [["x", "y"], ["z"]])
    writer.add_array("a.deep", [[[1.5], [2.5, 3.5]], [[4.5]]])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((2, 3, 64), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    header = gguf.read_header(path)
    meta = header.metadata
    assert header.version == 3 and header.alignment == 32
    assert meta["general.architecture"] == "llama"
    for key, (value, kind) in values.items():
        assert meta[key] == value and type(meta[key]) is type(value), key
        assert header.value_types[key] == (kind.value,)
    for key, (value, kind) in arrays.items():
        assert meta[key] == value, key
        assert header.value_types[key] == (ARRAY, kind.value)
    assert meta["a.nested"] == [[1, 2], [3], [4, 5, 6]]
    assert meta["a.nested_strings"] == [["x", "y"], ["z"]]
    assert meta["a.deep"] == [[[1.5], [2.5, 3.5]], [[4.5]]]
    assert header.value_types["a.nested"] == (ARRAY, ARRAY)

    # Tensor infos, against the gguf package's own reader.
    reference = gguf_py.GGUFReader(path)
    assert header.data_offset == reference.data_offset
    for tensor in reference.tensors:
        info = header.tensors[tensor.name]
        assert info.type == tensor.tensor_type.value
        assert info.dims == tuple(int(d) for d in tensor.shape)
        assert info.offset == tensor.data_offset
    assert header.tensors["blk.0.attn_q.weight"].shape == (2, 3, 64)

    # Checked but not read: each array a SkippedArray that knows its length and item type.
    skipped = gguf.read_header(path, array_values=False).metadata
    assert skipped["a.string"] == gguf.SkippedArray(STRING, 3) and len(skipped["a.string"]) == 3
    assert skipped["t.string"] == "héllo ✓"

    # MLX's reader on the same file, keys of the types it reads (no float64, no nesting).
    plain = tmp_path / "plain.gguf"
    writer = gguf_py.GGUFWriter(str(plain), "llama")
    for key, (value, kind) in values.items():
        if kind != T.FLOAT64:
            writer.add_key_value(key, value, kind)
    for key, (value, kind) in arrays.items():
        if kind != T.FLOAT64:
            writer.add_key_value(key, value, T.ARRAY, sub_type=kind)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, theirs = mx.load(str(plain), return_metadata=True)
    theirs = gguf.metadata_to_python(theirs)
    ours = gguf.read_header(plain).metadata
    assert set(ours) == set(theirs)
    for key in ours:
        assert (
            ours[key] == pytest.approx(theirs[key]) if "float" in key else ours[key] == theirs[key]
        )


def test_reader_matches_mlx_on_the_default_model():
    path = mlxinfer.default_model_path()
    header = gguf.read_header(path)
    _, theirs = mx.load(str(path), return_metadata=True)
    assert header.metadata == gguf.metadata_to_python(theirs)
    assert len(header.tensors) == 272 and header.data_offset == 1785664
    start = time.perf_counter()
    assert gguf.check_tensor_types(path).tensors.keys() == header.tensors.keys()
    assert time.perf_counter() - start < 1  # every load pays it: ~0.03 s here


def test_metadata_to_python():
    converted = gguf.metadata_to_python(
        {"s": mx.array(3, mx.uint32), "f": mx.array(0.5), "a": mx.array([1, 2]), "t": "text"}
    )
    assert converted == {"s": 3, "f": 0.5, "a": [1, 2], "t": "text"}
    assert type(converted["s"]) is int


# -- config_from_metadata ----------------------------------------------------------------------

BASE = {
    "general.architecture": "llama",
    "llama.attention.head_count": 8,
    "llama.embedding_length": 256,
    "llama.feed_forward_length": 512,
    "llama.block_count": 3,
    "tokenizer.ggml.tokens": ["a", "b", "c"],
}


def meta(**changes):
    """BASE with `llama.`-relative keys changed (None deletes)."""
    out = dict(BASE)
    for key, value in changes.items():
        full = key.replace("__", ".")
        full = full if full.startswith(("general.", "tokenizer.")) else f"llama.{full}"
        out.pop(full, None)
        if value is not None:
            out[full] = value
    return out


def test_config_from_metadata_defaults():
    config = gguf.config_from_metadata(BASE, "m.gguf")
    assert config == {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 32,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_traditional": True,
        "vocab_size": 3,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def test_config_from_metadata_reads_every_key():
    metadata = meta(
        attention__head_count_kv=2,
        attention__key_length=64,
        attention__layer_norm_rms_epsilon=1e-6,
        context_length=8192,
        rope__freq_base=5e5,
        vocab_size=1000,
        rope__scaling__type="linear",
        rope__scaling__factor=4.0,
        tokenizer__ggml__bos_token_id=1,
        tokenizer__ggml__eos_token_id=2,
    )
    config = gguf.config_from_metadata(metadata, "m.gguf")
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 64
    assert config["rms_norm_eps"] == 1e-6 and config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == 5e5 and config["vocab_size"] == 1000
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    none = gguf.config_from_metadata(meta(rope__scaling__type="none"), "m.gguf")
    assert "rope_scaling" not in none


@pytest.mark.parametrize(
    "arch, model_type, interleaved",
    [
        ("llama", "llama", True),
        ("qwen2", "qwen2", False),
        ("qwen3", "qwen3", False),
        ("gemma2", "gemma2", False),
        ("gemma3", "gemma3_text", False),
        ("qwen2moe", "qwen2_moe", False),
        ("qwen3moe", "qwen3_moe", False),
    ],
)
def test_architecture_table(arch, model_type, interleaved):
    metadata = {k.replace("llama.", f"{arch}."): v for k, v in BASE.items()}
    metadata["general.architecture"] = arch
    config = gguf.config_from_metadata(metadata, "m.gguf")
    assert config["model_type"] == model_type and config["rope_traditional"] is interleaved
    assert set(gguf.ARCHITECTURES) == {
        "llama",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3",
        "qwen2moe",
        "qwen3moe",
    }


@pytest.mark.parametrize(
    "key", ["attention.head_count", "embedding_length", "feed_forward_length", "block_count"]
)
def test_required_keys_are_named(key):
    with pytest.raises(ModelLoadError, match=rf"m\.gguf: GGUF metadata lacks 'llama\.{key}'"):
        gguf.config_from_metadata(meta(**{key.replace(".", "__"): None}), "m.gguf")


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"general__architecture": "gemma"},
            "architecture 'gemma' is not supported; supported: llama, qwen2, qwen3, gemma2, gemma3",
        ),
        ({"general__architecture": ["llama"]}, r"architecture \['llama'\] is not supported"),
        ({"block_count": 0}, "'llama.block_count' is 0, not a positive integer"),
        ({"embedding_length": "256"}, "'llama.embedding_length' is '256', not a positive"),
        ({"attention__head_count": True}, "'llama.attention.head_count' is True, not a positive"),
        (
            {"attention__head_count_kv": [2, 2, 2]},
            r"'llama.attention.head_count_kv' is \[2, 2, 2\]",
        ),
        ({"attention__layer_norm_rms_epsilon": -1e-6}, "is -1e-06, not a finite nonnegative"),
        ({"rope__freq_base": 0.0}, "'llama.rope.freq_base' is 0.0, not a finite positive"),
        ({"rope__freq_base": float("inf")}, "is inf, not a finite positive number"),
        ({"embedding_length": 4}, "embedding_length \\(4\\) is smaller than"),
        ({"vocab_size": None, "tokenizer__ggml__tokens": None}, "lacks llama.vocab_size and"),
        ({"rope__scaling__type": "yarn"}, "rope scaling 'yarn' is not supported"),
        ({"rope__scaling__type": "linear", "rope__scaling__factor": -2.0}, "factor' is -2.0"),
        ({"expert_count": 8}, "GGUF metadata lacks 'llama.expert_used_count'"),
        (
            {"expert_count": 8, "expert_used_count": 0},
            "'llama.expert_used_count' is 0, not a positive integer",
        ),
    ],
)
def test_bad_metadata_values_are_named(changes, message):
    with pytest.raises(ModelLoadError, match=r"m\.gguf: .*" + message.replace(".", r"\.")):
        gguf.config_from_metadata(meta(**changes), "m.gguf")


def test_config_from_metadata_of_the_default_model():
    header = gguf.read_header(mlxinfer.default_model_path(), array_values=False)
    config = gguf.config_from_metadata(header.metadata, "default")
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)


# -- tensor names --------------------------------------------------------------------------------


def test_rename_tensors_maps_every_llama_cpp_name():
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "rope_freqs.weight": "rope_freqs.weight",
        "blk.11.attn_q.bias": "model.layers.11.self_attn.q_proj.bias",
        "blk.0.attn_k.scales": "model.layers.0.self_attn.k_proj.scales",
        "blk.0.attn_v.biases": "model.layers.0.self_attn.v_proj.biases",
    }
    for part, ours in {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
        "ffn_up_exps": "mlp.switch_mlp.up_proj",
        "ffn_down_exps": "mlp.switch_mlp.down_proj",
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
        "ffn_up_shexp": "mlp.shared_expert.up_proj",
        "ffn_down_shexp": "mlp.shared_expert.down_proj",
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    }.items():
        names[f"blk.3.{part}.weight"] = f"model.layers.3.{ours}.weight"
    arrays = {name: mx.array([[i]]) for i, name in enumerate(names)}
    renamed = gguf.rename_tensors(arrays, "m.gguf")
    assert set(renamed) == set(names.values())
    for name, ours in names.items():
        assert renamed[ours] is arrays[name]
    # llama.cpp's 1-D shared-expert gate becomes the [1, D] weight of a Linear
    gate = gguf.rename_tensors({"blk.0.ffn_gate_inp_shexp.weight": mx.ones(8)}, "m.gguf")
    assert gate["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 8)


@pytest.mark.parametrize(
    "name",
    [
        "blk.0.ffn_gate_chexps.weight",
        "blk.x.attn_q.weight",
        "token_embd.weight.extra",
        "pos_embd.weight",
    ],
)
def test_rename_tensors_names_the_unexpected_tensor(name):
    with pytest.raises(ModelLoadError, match=rf"m\.gguf: unexpected GGUF tensor '{name}'"):
        gguf.rename_tensors({name: mx.array([0])}, "m.gguf")


def test_tiny_gguf_loads(tiny_gguf):
    """The file the fuzz tests damage loads, as float32 and quantized."""
    model, tokenizer = mlxinfer.load(tiny_gguf)
    assert model.config.num_hidden_layers == 2 and model.config.rope_traditional
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 128) and np.isfinite(np.array(logits)).all()
    assert tokenizer.decode([0, 1]) == '!"'
