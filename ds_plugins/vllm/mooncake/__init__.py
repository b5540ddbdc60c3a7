"""Mooncake prefill/decode disaggregation for vLLM (decision `mooncake_connector=ds_plugins`): `connector`
is the module vLLM loads through `kv_connector_module_path`; the transfer logic is in ds_plugins.kv."""
