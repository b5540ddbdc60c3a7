"""vLLM layer methods for msModelSlim schemes (imports vLLM; loaded by ascend.config on first use).

Parameters are created in the checkpoint's dtypes and layouts, so vLLM's own weight loaders shard
them (output-dim for column-parallel and w1/w3, input-dim for row-parallel and w2; W4A8 packs along
the output dim, which keeps both kinds of sharding exact). After loading, scales are flattened to
fp32, zero offsets are checked and dropped, and the math runs in ds_plugins.quant.ascend.compute.

Linear parameters other than `weight` are registered under the name the model's weight mapper gives
the checkpoint tensor (AscendQuantConfig.loaded_name: `weight_scale_inv`, `input_scale_2` in vLLM's
CPU DeepSeek-V4) and, where that differs, under the checkpoint's own name as well: vLLM hands
`configure_quant_config` the model class's mapper, while a model may load with another one it builds
per instance (the CPU DeepSeek-V4 with `expert_dtype` other than "fp4" keeps `.weight_scale`). The
weight loaders mark what they loaded; after loading, the loaded one is kept under the scheme's own
name, so the compute path and the rest of vLLM see one layout whatever the model file renames.
"""

from __future__ import annotations

import re

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearMethodBase, RowParallelLinear
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter, PerTensorScaleParameter
from vllm.model_executor.utils import set_weight_attrs

from ...quant.ascend import arith, compute
from ...quant.ascend.errors import AscendFormatError
from .compat import FusedMoEMethodBase, FusedMoeWeightScaleSupported

_DTYPES = {
    "float32": torch.float32,
    "int64": torch.int64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}


def _column_loader(loader):
    """Scales stored [out] load into [out, 1] parameters (msModelSlim writes both forms)."""

    def load(param, loaded_weight, *args, **kwargs):
        if loaded_weight.dim() == 1 and param.dim() == 2:
            loaded_weight = loaded_weight.reshape(-1, 1)
        return loader(param, loaded_weight, *args, **kwargs)

    return load


def _drop(layer, name: str) -> None:
    if hasattr(layer, name):
        delattr(layer, name)


def _marking(loader):
    """The weight loader, recording on the parameter that a checkpoint tensor arrived in it."""

    def load(param, loaded_weight, *args, **kwargs):
        param.ds_loaded = True
        return loader(param, loaded_weight, *args, **kwargs)

    return load


def _names(config, prefix: str, leaves) -> dict[str, tuple[str, ...]]:
    """Checkpoint leaf -> the parameter names it may arrive under (the mapper's first)."""
    return {leaf: tuple(dict.fromkeys((config.loaded_name(prefix, leaf), leaf))) for leaf in leaves}


def _register(layer, names: dict[str, tuple[str, ...]], leaf: str, make) -> None:
    """One parameter per name leaf may arrive under; make(weight_loader_wrapper) builds one."""
    for name in names[leaf]:
        layer.register_parameter(name, make(_marking))


def _take(config, prefix: str, layer, names: dict[str, tuple[str, ...]], leaf: str) -> torch.Tensor:
    """The loaded tensor of checkpoint leaf `leaf`, its parameters removed from the layer."""
    candidates = names[leaf]
    loaded = [n for n in candidates if getattr(getattr(layer, n), "ds_loaded", False)]
    if len(candidates) > 1 and len(loaded) != 1:
        raise AscendFormatError(
            config.checkpoint.description.path,
            f"{prefix}.{leaf}",
            f"vLLM's loader delivered it as {' and '.join(loaded) or 'none'} of "
            f"{', '.join(candidates)}; expected exactly one",
        )
    data = getattr(layer, (loaded or candidates)[0]).data
    for n in candidates:
        _drop(layer, n)
    return data


def _check_zero(config, prefix: str, t: torch.Tensor, what: str) -> None:
    if bool(t.ne(0).any()):
        raise AscendFormatError(
            config.checkpoint.description.path,
            f"{prefix}.{what}",
            "non-zero offset: asymmetric weights are not supported",
        )


def _check_finite(config, prefix: str, t: torch.Tensor, what: str) -> None:
    """The scales as vLLM placed them. Checkpoint() already refused NaN or infinite scales in the files
    (ds_plugins/quant/ascend/values.py); this catches a load that changed them (a mapper that routed
    another tensor here), which would turn every output of the layer into NaN."""
    bad = ~torch.isfinite(t.float())
    if bool(bad.any()):
        raise AscendFormatError(
            config.checkpoint.description.path,
            f"{prefix}.{what}",
            f"{int(bad.sum())} of {t.numel()} values are NaN or infinite",
        )


def _shard_names(config, prefix: str) -> list[str]:
    return config.shards_of(prefix)


def _header_dtype(config, prefix: str, suffix: str, default: torch.dtype) -> torch.dtype:
    alts = "|".join(re.escape(n) for n in _shard_names(config, prefix))
    infos = config.header(rf"^({alts})\.{suffix}$")
    kinds = {i.dtype for i in infos}
    if len(kinds) > 1:
        raise AscendFormatError(
            config.checkpoint.description.path,
            f"{prefix}.{suffix}",
            f"shards of one vLLM layer store {suffix} as different dtypes {sorted(kinds)}",
        )
    return _DTYPES[kinds.pop()] if kinds else default


def _int8_weight(layer, input_size_per_partition: int, output_partition_sizes, loader) -> int:
    """The W8A8 linears' int8 weight [out, in] (vLLM's ModelWeightParameter, loaded by the layer's own
    loader); returns out, the fused output width."""
    out = sum(output_partition_sizes)
    layer.logical_widths = output_partition_sizes
    layer.register_parameter(
        "weight",
        ModelWeightParameter(
            data=torch.empty(out, input_size_per_partition, dtype=torch.int8),
            input_dim=1,
            output_dim=0,
            weight_loader=loader,
        ),
    )
    return out


class _SchemeLinearMethod(LinearMethodBase):
    """A linear method for one msModelSlim scheme: the quant config and the layer's prefix, by which it
    finds the layer's tensors in the checkpoint."""

    def __init__(self, config, prefix: str):
        self.config, self.prefix = config, prefix


class W8A8DynamicLinearMethod(_SchemeLinearMethod):
    def create_weights(
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        **extra_weight_attrs,
    ):
        loader = extra_weight_attrs.get("weight_loader")
        out = _int8_weight(layer, input_size_per_partition, output_partition_sizes, loader)
        self.names = _names(self.config, self.prefix, ("weight_scale", "weight_offset"))
        for leaf in self.names:
            _register(
                layer,
                self.names,
                leaf,
                lambda mark: ChannelQuantScaleParameter(
                    data=torch.empty(out, 1, dtype=torch.float32),
                    output_dim=0,
                    weight_loader=mark(_column_loader(loader)),
                ),
            )

    def process_weights_after_loading(self, layer) -> None:
        take = lambda leaf: _take(self.config, self.prefix, layer, self.names, leaf)  # noqa: E731
        _check_zero(self.config, self.prefix, take("weight_offset"), "weight_offset")
        scale = take("weight_scale").reshape(-1).float().contiguous()
        _check_finite(self.config, self.prefix, scale, "weight_scale")
        layer.weight_scale = Parameter(scale, requires_grad=False)
        layer.weight = Parameter(layer.weight.data.contiguous(), requires_grad=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return compute.linear_dynamic(x, layer.weight, layer.weight_scale, bias)


class W8A8StaticLinearMethod(_SchemeLinearMethod):
    """Static W8A8: one input scale/offset per checkpoint shard; a fused layer whose shards were
    calibrated with different activation scales is refused at load (DeepSeek-V4 recipes do not use
    this scheme)."""

    def create_weights(
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        **extra_weight_attrs,
    ):
        loader = extra_weight_attrs.get("weight_loader")
        out = _int8_weight(layer, input_size_per_partition, output_partition_sizes, loader)
        n = len(output_partition_sizes)
        shards = "|".join(re.escape(s) for s in _shard_names(self.config, self.prefix))
        optional = [
            leaf
            for leaf in ("weight_scale", "weight_offset")  # written by msModelSlim, unused by the math
            if self.config.header(rf"^({shards})\.{leaf}$")
        ]
        self.names = _names(
            self.config, self.prefix, ("input_scale", "input_offset", "deq_scale", "quant_bias", *optional)
        )
        offset_dtype = _header_dtype(self.config, self.prefix, "input_offset", torch.float32)
        for leaf, dtype in (("input_scale", torch.float32), ("input_offset", offset_dtype)):
            _register(
                layer,
                self.names,
                leaf,
                lambda mark, dtype=dtype: _per_tensor(
                    PerTensorScaleParameter(
                        data=torch.zeros(n, dtype=dtype), weight_loader=mark(_per_tensor_loader(loader))
                    )
                ),
            )
        for leaf, dtype in (
            ("deq_scale", _header_dtype(self.config, self.prefix, "deq_scale", torch.float32)),
            ("quant_bias", torch.int32),
        ):
            _register(
                layer,
                self.names,
                leaf,
                lambda mark, dtype=dtype: ChannelQuantScaleParameter(
                    data=torch.empty(out, dtype=dtype), output_dim=0, weight_loader=mark(loader)
                ),
            )
        for leaf in optional:
            _register(
                layer,
                self.names,
                leaf,
                lambda mark: ChannelQuantScaleParameter(
                    data=torch.empty(out, 1, dtype=torch.float32),
                    output_dim=0,
                    weight_loader=mark(_column_loader(loader)),
                ),
            )

    def process_weights_after_loading(self, layer) -> None:
        taken = {leaf: _take(self.config, self.prefix, layer, self.names, leaf) for leaf in self.names}
        scales, offsets = taken["input_scale"].float(), taken["input_offset"].float()
        if bool((scales != scales[0]).any()) or bool((offsets != offsets[0]).any()):
            raise AscendFormatError(
                self.config.checkpoint.description.path,
                f"{self.prefix}.input_scale",
                f"the shards of this fused layer have different activation scales/offsets "
                f"({scales.tolist()}, {offsets.tolist()}); static W8A8 needs one per layer",
            )
        deq = arith.decode_deq_scale(taken["deq_scale"]).reshape(-1).contiguous()
        for what, t in (("input_scale", scales), ("input_offset", offsets), ("deq_scale", deq)):
            _check_finite(self.config, self.prefix, t, what)
        qb = taken["quant_bias"].to(torch.int32).reshape(-1).contiguous()
        if isinstance(layer, RowParallelLinear) and getattr(layer, "tp_rank", 0) != 0:
            qb = None  # the bias (and offset correction) is added once, on rank 0, before the all-reduce
        layer.input_scale = Parameter(scales[:1].reshape(()), requires_grad=False)
        layer.input_offset = Parameter(offsets[:1].reshape(()), requires_grad=False)
        layer.deq_scale = Parameter(deq, requires_grad=False)
        layer.quant_bias = Parameter(qb, requires_grad=False) if qb is not None else None

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # A float bias is folded into quant_bias by msModelSlim; vLLM's own bias param stays unused.
        return compute.linear_static(
            x, layer.weight, layer.input_scale, layer.input_offset, layer.quant_bias, layer.deq_scale
        )


def _per_tensor(param):
    """One value per checkpoint shard: vLLM's fused-layer loaders (the non-v2 `weight_loader` our methods
    get) place shard i's scalar at index i only for parameters marked `needs_scalar_to_array`."""
    set_weight_attrs(param, {"needs_scalar_to_array": True})
    return param


def _per_tensor_loader(loader):
    def load(param, loaded_weight, *args, **kwargs):
        return loader(
            param,
            loaded_weight.reshape(-1)[:1].reshape(()) if loaded_weight.numel() == 1 else loaded_weight,
            *args,
            **kwargs,
        )

    return load


class AscendMoEMethod(FusedMoEMethodBase):
    """Routed experts, W8A8_DYNAMIC or W4A8_DYNAMIC (int4 packed two per byte, kept packed)."""

    def __init__(self, moe, scheme: str, config, prefix: str):
        super().__init__(moe)
        self.scheme, self.config, self.prefix = scheme, config, prefix
        self.packed = scheme == "W4A8_DYNAMIC"

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
    ):
        act = str(getattr(self.moe, "activation", "silu")).lower()
        if "silu" not in act or "no_mul" in act:
            raise AscendFormatError(
                self.config.checkpoint.description.path,
                self.prefix,
                f"MoE activation {act!r}: the msModelSlim experts compute SwiGLU (silu)",
            )
        E, H, I = num_experts, hidden_size, intermediate_size_per_partition
        f = 2 if self.packed else 1
        for name, shape in (("w13_weight", (E, 2 * I // f, H)), ("w2_weight", (E, H // f, I))):
            p = Parameter(torch.empty(*shape, dtype=torch.int8), requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, extra_weight_attrs)
        scale_attrs = dict(extra_weight_attrs, quant_method=FusedMoeWeightScaleSupported.CHANNEL.value)
        for name, shape in (("w13_weight_scale", (E, 2 * I, 1)), ("w2_weight_scale", (E, H, 1))):
            p = Parameter(torch.empty(*shape, dtype=torch.float32), requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, scale_attrs)
        # Offsets (always zero) and scale_bias (a kernel helper, research §1.7) are checked and not kept.
        for name in ("w13_weight_offset", "w2_weight_offset", "w13_scale_bias", "w2_scale_bias"):
            p = Parameter(torch.empty(0), requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, {"weight_loader": self._discard})

    def _discard(self, param, loaded_weight, weight_name, shard_id=None, expert_id=None, return_success=False, **_):
        if "offset" in weight_name and bool(loaded_weight.ne(0).any()):
            raise AscendFormatError(
                self.config.checkpoint.description.path,
                f"{weight_name} (expert {expert_id}, {shard_id})",
                "non-zero offset: asymmetric weights are not supported",
            )
        return True if return_success else None

    def process_weights_after_loading(self, layer) -> None:
        for name in ("w13_weight_offset", "w2_weight_offset", "w13_scale_bias", "w2_scale_bias"):
            _drop(layer, name)
        E = layer.w13_weight.shape[0]
        for name in ("w13_weight_scale", "w2_weight_scale"):
            _check_finite(self.config, self.prefix, getattr(layer, name).data, name)
        layer.w13_weight_scale = Parameter(
            layer.w13_weight_scale.data.reshape(E, -1).float().contiguous(), requires_grad=False
        )
        layer.w2_weight_scale = Parameter(
            layer.w2_weight_scale.data.reshape(E, -1).float().contiguous(), requires_grad=False
        )

    def get_fused_moe_quant_config(self, layer):
        return None  # our own compute path: vLLM's modular kernels are not used

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        limit = getattr(layer, "swiglu_limit", None)
        if limit is None:
            limit = getattr(self.moe, "swiglu_limit", None)
        return compute.moe(
            x,
            topk_weights,
            topk_ids,
            layer.w13_weight,
            layer.w13_weight_scale,
            layer.w2_weight,
            layer.w2_weight_scale,
            packed_int4=self.packed,
            limit=limit,
            expert_map=getattr(layer, "expert_map", None),
        )
