"""msModelSlim twins of the tiny DeepSeek-V4 checkpoint (tests/e2e/checkpoint.py), and their dequantised twins.

    KINDS                                   "w8a8_dynamic", "w4a8_dynamic", "w8a8_static"
    recipe(state, kind) -> {module: scheme} which native modules each twin quantizes, and how
    quantize(state, kind, calib=None) -> Twin
    calibrate(model_dir, prompts, modules)  static activation ranges (transformers, float32, forward pre-hooks)
    write_twin(directory, bf16_dir, twin, expert_dtype=None) -> Path      the msModelSlim directory
    write_dequantised(directory, bf16_dir, twin) -> Path                  the float twin (same layout as bf16_dir)

The split follows the msModelSlim DeepSeek-V4 recipes:
`deepseek_v4_flash_w8a8.yaml` quantizes the attention linears `wq_a`, `wkv`, `wq_b`, `indexer.wq_b` and every
FFN linear but the router (`ffn.gate`) W8A8_DYNAMIC, and keeps `wo_a`, `wo_b`, the compressors, the indexer's
`weights_proj` and its compressor, norms, mHC, embed and head FLOAT. The W4A8 twin is the Pro recipe's
split (`deepseek_v4_pro_w4a8.yaml`): routed experts W4A8_DYNAMIC, shared experts W8A8_DYNAMIC. No recipe uses
static W8A8 for V4; the static twin puts the same four attention linears on it (activations calibrated on
the float model, per-tensor asymmetric, as msModelSlim's static scheme does) and keeps the FFN W8A8_DYNAMIC,
so the static scheme runs on a real model's attention inputs.

The quantization itself is tests/quant/writer.py (the test-side msModelSlim writer, independent of
ds_plugins.quant). A dequantised twin holds the same integers times their scales, in float32, under the
bf16 checkpoint's names, so transformers (or vLLM without --quantization) runs exactly the weights the
quantized twin encodes; what differs between the two is only the activation quantization.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.quant import writer
from tests.quant.fixtures import unpack_np

KINDS = ("w8a8_dynamic", "w4a8_dynamic", "w8a8_static")

# deepseek_v4_flash_w8a8.yaml: W8A8_DYNAMIC on *attn* and *ffn* linears except these (FLOAT).
_ATTN_FLOAT = (
    "*.attn.wo_a",
    "*.attn.wo_b",
    "*.compressor.wgate",
    "*.compressor.wkv",
    "*.indexer.weights_proj",
    "*.indexer.compressor.*",
)
_FFN_FLOAT = ("*.ffn.gate",)
# Static activation ranges are widened by this factor around the calibrated [min, max]: served prompts
# include generated tokens the calibration pass did not see; 5 % keeps them off the clamp.
CALIB_MARGIN = 1.05
# Files of the bf16 checkpoint a twin copies as they are.
_COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")


def linear_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Native names of the linear layers: every 2-D `<module>.weight` inside a decoder layer."""
    return [
        k[: -len(".weight")]
        for k, t in state.items()
        if k.startswith("layers.") and k.endswith(".weight") and t.dim() == 2
    ]


def _matches(module: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def recipe(state: dict[str, torch.Tensor], kind: str) -> dict[str, str]:
    """Native module -> scheme, for the quantized modules of twin `kind` (everything else FLOAT)."""
    if kind not in KINDS:
        raise ValueError(f"unknown twin kind {kind!r}; one of {KINDS}")
    out = {}
    for m in linear_modules(state):
        if ".attn." in m and not _matches(m, _ATTN_FLOAT):
            out[m] = "W8A8" if kind == "w8a8_static" else "W8A8_DYNAMIC"
        elif ".ffn." in m and not _matches(m, _FFN_FLOAT):
            routed = ".ffn.experts." in m
            out[m] = "W4A8_DYNAMIC" if kind == "w4a8_dynamic" and routed else "W8A8_DYNAMIC"
    return out


@dataclass
class Twin:
    kind: str
    modules: dict[str, tuple[str, dict[str, torch.Tensor]]]  # native module -> (scheme, tensors by suffix)
    floats: dict[str, torch.Tensor]  # every other tensor, as in the bf16 checkpoint
    dequantised: dict[str, torch.Tensor] = field(default_factory=dict)  # "<module>.weight" -> float32

    @property
    def schemes(self) -> dict[str, str]:
        return {m: s for m, (s, _) in self.modules.items()}


def _dequantise(scheme: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight the stored integers and scales encode (test-side unpack for int4)."""
    if scheme == "W4A8_DYNAMIC":
        q = unpack_np(parts["weight"])
    else:
        q = parts["weight"]
    return q.to(torch.float32) * parts["weight_scale"].to(torch.float32).reshape(-1, 1)


def quantize(state: dict[str, torch.Tensor], kind: str, calib: dict[str, tuple[float, float]] | None = None) -> Twin:
    """Quantize the bf16 `state` (checkpoint.state_dict) as twin `kind`. `calib`: module -> (min, max) of its
    input activations, needed by the static twin (calibrate())."""
    plan = recipe(state, kind)
    modules: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for module, scheme in plan.items():
        w = state[f"{module}.weight"]
        if scheme == "W8A8_DYNAMIC":
            parts = writer.w8a8_dynamic(w)
        elif scheme == "W4A8_DYNAMIC":
            parts = writer.w4a8_dynamic(w, "down" if module.endswith(".w2") else "gate")
        else:
            if calib is None or module not in calib:
                raise ValueError(f"static W8A8 needs the calibrated input range of {module}")
            lo, hi = calib[module]
            mid, half = (hi + lo) / 2, (hi - lo) / 2 * CALIB_MARGIN
            parts = writer.w8a8_static(w, None, torch.tensor([mid - half, mid + half]), deq_int64=False)
        modules[module] = (scheme, parts)
    quantized = {f"{m}.weight" for m in plan}
    floats = {k: t for k, t in state.items() if k not in quantized}
    twin = Twin(kind, modules, floats)
    twin.dequantised = {f"{m}.weight": _dequantise(s, p) for m, (s, p) in modules.items()}
    return twin


def _copy_side_files(bf16_dir: Path, directory: Path, expert_dtype: str | None) -> None:
    cfg = json.loads((bf16_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)  # msModelSlim copies config.json without it
    cfg.pop("expert_dtype", None)
    if expert_dtype is not None:
        cfg["expert_dtype"] = expert_dtype
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in _COPIED:
        if (bf16_dir / name).exists():
            shutil.copy(bf16_dir / name, directory / name)


def write_twin(
    directory: Path, bf16_dir: Path, twin: Twin, *, expert_dtype: str | None = None, shards: int = 2
) -> Path:
    """The msModelSlim output directory: quant_model_description.json, quant_model_weights-*.safetensors
    (+ index), config.json (expert_dtype set only when given), generation config and tokenizer."""
    directory, bf16_dir = Path(directory), Path(bf16_dir)
    writer.write(directory, twin.modules, twin.floats, shards=shards)
    _copy_side_files(bf16_dir, directory, expert_dtype)
    return directory


def write_dequantised(directory: Path, bf16_dir: Path, twin: Twin) -> Path:
    """The dequantised twin: the bf16 checkpoint with each quantized weight replaced by its dequantised
    float32 value (model.safetensors + index, config, tokenizer), loadable by transformers and vLLM."""
    from safetensors.torch import save_file

    directory, bf16_dir = Path(directory), Path(bf16_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {**twin.floats, **twin.dequantised}
    tensors = {k: tensors[k].contiguous() for k in sorted(tensors)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {k: "model.safetensors" for k in tensors},
            },
            indent=1,
        )
    )
    _copy_side_files(bf16_dir, directory, None)
    return directory


def calibrate(model_dir: Path, prompts: list[list[int]], modules: list[str]) -> dict[str, tuple[float, float]]:
    """min/max of the input activations of native `modules` over `prompts` (token id lists), from
    transformers' DeepseekV4ForCausalLM in float32 on the checkpoint in `model_dir`."""
    from transformers import DeepseekV4ForCausalLM

    from ds_plugins.quant.ascend import names

    model = DeepseekV4ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ranges: dict[str, list[float]] = {}
    hooks = []
    for module in modules:
        hf = names.dsv4_to_transformers(module + ".weight").rsplit(".", 1)[0]

        def hook(_mod, args, module=module):
            x = args[0].detach()
            lo, hi = ranges.setdefault(module, [float("inf"), float("-inf")])
            ranges[module] = [min(lo, float(x.min())), max(hi, float(x.max()))]

        hooks.append(model.get_submodule(hf).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in prompts:
                model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    missing = set(modules) - set(ranges)
    if missing:
        raise RuntimeError(f"calibration saw no input for {sorted(missing)}")
    return {m: (lo, hi) for m, (lo, hi) in ranges.items()}
