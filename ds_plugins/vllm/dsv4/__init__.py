"""DeepSeek-V4 on SM12x through stock vLLM: the model hook-up (decision `dsv4_model=ds_plugins`).

- `registry`: the architectures DeepseekV4ForCausalLM / DeepSeekV4MTPModel point at `hookup`, which
  subclasses vLLM's own V4 classes (nothing of the model is rewritten).
- `routes`: the V4 model's calls into FlashMLA / DeepGEMM that have no SM12x kernel go to
  ds_plugins.kernels (decisions `sparse_mla=triton`, `indexer=triton`).
- `cudagraph`: DS_PLUGINS_CUDAGRAPH=off turns CUDA graphs off for a V4 model on this path only.
"""
