"""KV-cache transfer between engines (prefill/decode disaggregation), engine-agnostic.

Nothing here imports an engine: the adapters (ds_plugins.vllm.mooncake.connector) turn their
engine's requests and cache tensors into the plain block ids and memory regions used here.
"""
