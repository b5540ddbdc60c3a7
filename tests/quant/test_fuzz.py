"""Seeded, bounded fuzzing of msModelSlim checkpoints (issue #17): random truncation, random byte
flips in the safetensors headers and in the description, random dtype and shape swaps, and the named
cases of malformed.py. Each damaged checkpoint must end in one of two ways:

- refused: an AscendFormatError, one line, naming a file of the checkpoint (and the tensor key, unless
  the file as a whole is at fault), raised by Checkpoint(), before any weight is placed; or
- loaded correctly: every quantized layer (QuantLinear, QuantExperts) computes what the independent
  float64 formulas give for the undamaged checkpoint (fixtures.layer_checkpoint), every FLOAT tensor
  reads back equal to the original, and no output is NaN.

Never another exception, never a silent wrong or NaN result. Shape swaps are drawn among the tensors
of quantized modules: a FLOAT tensor's shape is the model's to check (vLLM's weight loader compares
it with the parameter it loads into), so this module-level harness cannot judge one.
"""

import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ds_plugins.quant.ascend import AscendFormatError, compute
from ds_plugins.quant.ascend.checkpoint import DTYPES
from ds_plugins.quant.ascend.loader import Checkpoint
from ds_plugins.quant.ascend.modules import QuantExperts, QuantLinear

from . import malformed
from .fixtures import layer_checkpoint

SEED = 20261202
N_TRUNCATE, N_HEADER_FLIPS, N_DESC_FLIPS, N_DTYPE, N_SHAPE = 60, 240, 80, 100, 100
FILE_LEVEL = (
    "not a safetensors file",
    "unreadable safetensors header",
    "truncated",
    "not valid JSON",
    "expected a JSON object",
    "bad safetensors header",
    "bytes after the last tensor",
    "lists no tensors",
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-pristine")
    ref = layer_checkpoint(d)
    floats = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            floats.update({k: h.get_tensor(k) for k in h.keys() if malformed.desc(d)[k] == "FLOAT"})
    return d, ref, floats


@pytest.fixture
def work(pristine, tmp_path, monkeypatch):
    monkeypatch.setattr(compute, "path_for", lambda t: "torch")  # the CPU path; the kernels are tested elsewhere
    d = tmp_path / "c"
    shutil.copytree(pristine[0], d)
    return d


def _load_and_compare(d: Path, ref: dict, floats: dict) -> None:
    c = Checkpoint(d)
    x = ref["x"]
    fused = torch.cat([QuantLinear(c, m)(x.float()) for m in ("layers.0.attn.wq_a", "layers.0.attn.wkv")], 1)
    wo_a = QuantLinear(c, "layers.0.attn.wo_a")(x.float())
    moe = QuantExperts(c, "layers.0.ffn.experts", ref["E"], swiglu_limit=10.0)(
        x.float(), ref["topk_ids"], ref["topk_weights"]
    )
    for got, want in ((fused, ref["fused_wqa_wkv"]), (wo_a, ref["wo_a"]), (moe, ref["moe"])):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-4)
    for key, t in floats.items():
        got = c.read(key)
        assert got.dtype == t.dtype and torch.equal(got, t), key


def _oracle(d: Path, pristine, what: str) -> str:
    _, ref, floats = pristine
    try:
        _load_and_compare(d, ref, floats)
    except AscendFormatError as err:
        msg = str(err)
        assert "\n" not in msg and msg.startswith(f"msModelSlim checkpoint: {err.file}"), (what, msg)
        assert Path(err.file).parent == d or Path(err.file) == d, (what, msg)
        if err.key is None:
            assert any(p in msg for p in FILE_LEVEL), (what, msg)
        return "refused"
    return "loaded"


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _restore(d: Path, pristine_dir: Path) -> None:
    for f in list(d.iterdir()):
        f.unlink()
    for f in pristine_dir.iterdir():
        shutil.copy(f, d / f.name)


def _run(work, pristine, cases) -> dict:
    outcomes = {"refused": 0, "loaded": 0}
    for what, damage in cases:
        damage(work)
        outcomes[_oracle(work, pristine, what)] += 1
        _restore(work, pristine[0])
    return outcomes


def _truncations(rng):
    def cut(file_index, length):
        def damage(d):
            f = _shards(d)[file_index]
            raw = f.read_bytes()
            f.write_bytes(raw[: int(length * len(raw))])

        return damage

    return [
        (f"truncate shard {i} to {x:.3f}", cut(i, x))
        for i, x in ((rng.randrange(2), rng.random()) for _ in range(N_TRUNCATE))
    ]


def _header_flips(rng):
    def flip(file_index, picks):
        def damage(d):
            f = _shards(d)[file_index]
            raw = bytearray(f.read_bytes())
            (n,) = struct.unpack("<Q", raw[:8])
            for pos, mask in picks:
                raw[int(pos * (8 + n))] ^= mask
            f.write_bytes(bytes(raw))

        return damage

    cases = []
    for _ in range(N_HEADER_FLIPS):
        picks = [(rng.random(), rng.randrange(1, 256)) for _ in range(rng.randrange(1, 4))]
        cases.append((f"flip header bytes {picks}", flip(rng.randrange(2), picks)))
    return cases


def _desc_flips(rng):
    def flip(pos, mask):
        def damage(d):
            f = d / malformed.DESC
            raw = bytearray(f.read_bytes())
            raw[int(pos * len(raw))] ^= mask
            f.write_bytes(bytes(raw))

        return damage

    return [
        (f"flip description byte {p:.4f}^{m}", flip(p, m))
        for p, m in ((rng.random(), rng.randrange(1, 256)) for _ in range(N_DESC_FLIPS))
    ]


def _entries(d: Path):
    out = []
    for f in _shards(d):
        header, _ = malformed.read_raw(f)
        out += [(f, k) for k in sorted(header) if k != "__metadata__"]
    return out


def _dtype_swaps(rng, pristine_dir):
    entries = _entries(pristine_dir)
    tags = sorted(DTYPES)

    def swap(i, tag):
        def damage(d):
            f, key = entries[i]
            f = d / f.name
            header, data = malformed.read_raw(f)
            header[key]["dtype"] = tag
            malformed.write_raw(f, header, data)

        return damage

    return [
        (f"dtype of {entries[i][1]} -> {t}", swap(i, t))
        for i, t in ((rng.randrange(len(entries)), rng.choice(tags)) for _ in range(N_DTYPE))
    ]


def _shape_swaps(rng, pristine_dir):
    desc = malformed.desc(pristine_dir)
    entries = [(f, k) for f, k in _entries(pristine_dir) if desc[k] != "FLOAT"]

    def reshape(i, choice):
        def damage(d):
            f, key = entries[i]
            f = d / f.name
            header, data = malformed.read_raw(f)
            shape = header[key]["shape"]
            n = 1
            for s in shape:
                n *= s
            options = [list(reversed(shape)), [n], [n, 1], [1, n]] + (
                [[shape[0] // 2, shape[1] * 2]] if len(shape) == 2 and shape[0] % 2 == 0 else []
            )
            options = [o for o in options if o != shape] or [[n, 1]]
            header[key]["shape"] = options[int(choice * len(options))]
            malformed.write_raw(f, header, data)

        return damage

    return [
        (f"shape of {entries[i][1]} #{c:.2f}", reshape(i, c))
        for i, c in ((rng.randrange(len(entries)), rng.random()) for _ in range(N_SHAPE))
    ]


def test_fuzz_truncation_and_header_flips(work, pristine):
    rng = random.Random(SEED)
    out = _run(work, pristine, _truncations(rng) + _header_flips(rng))
    assert out["refused"] >= N_TRUNCATE  # a truncated file never loads (a few flips land in harmless spots)


def test_fuzz_description_flips(work, pristine):
    out = _run(work, pristine, _desc_flips(random.Random(SEED + 1)))
    assert out["refused"] > 0


def test_fuzz_dtype_and_shape_swaps(work, pristine):
    rng = random.Random(SEED + 2)
    out = _run(work, pristine, _dtype_swaps(rng, pristine[0]) + _shape_swaps(rng, pristine[0]))
    assert out["refused"] > 0


def test_fuzz_oracle_on_named_cases(work, pristine):
    """The named malformed cases through the fuzz oracle (all refused), and the undamaged checkpoint loaded."""
    assert _oracle(work, pristine, "pristine") == "loaded"
    out = _run(work, pristine, [(c.__name__, c) for c in malformed.CASES])
    assert out == {"refused": len(malformed.CASES), "loaded": 0}
