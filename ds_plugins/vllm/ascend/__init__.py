"""`--quantization ascend` on stock vLLM: msModelSlim checkpoints (decision `ascend_quant=ds_plugins`).

- `install`: registers the "ascend" QuantizationConfig through vLLM's public register_quantization_config.
- `config`: that config (reads the checkpoint's description, picks a method per layer).
- `methods`: vLLM linear / MoE methods for the msModelSlim schemes, on ds_plugins.quant.ascend.
- `compat`: the vLLM classes they build on, found by probing the imported vLLM.
- `remote`: the description and weights of a checkpoint named by hub id.
"""
