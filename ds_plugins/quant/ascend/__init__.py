"""msModelSlim (`quant_model_description.json`) checkpoints: format, validation, DeepSeek-V4 names,
scheme math and compute paths. Engine-agnostic: the vLLM hook-up is ds_plugins/vllm/ascend/install.py.

    description.py  the JSON: global keys, one quant type per tensor
    checkpoint.py   safetensors headers (dtype, shape, file, offsets against the file) without tensor data
    layout.py       what config.json says the model has (layers, MTP layers, experts, dtype)
    schemes.py      per-scheme tensor rules; validate() raises AscendFormatError naming file and key
    structure.py    checks across modules: experts, MLP and fused shapes, layers against the layout
    values.py       the checks that read small tensors: finite positive scales, W4A8 scale_bias
    names.py        DeepSeek-V4 native names -> vLLM / transformers names
    arith.py        the formulas in PyTorch (reference and CPU path)
    compute.py      dispatch: torch_npu (npu.py) | Triton (triton_kernels.py) | arith
    loader.py, modules.py  engine-agnostic loading into torch modules
"""

from .errors import AscendFormatError

__all__ = ["AscendFormatError"]
