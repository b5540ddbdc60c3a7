"""The connector's module path of ds-plugins 0.1 (`kv_connector_module_path: ds_plugins.vllm.mooncake_connector`),
kept so existing configurations load: this name is the very module ds_plugins.vllm.mooncake.connector, not a
copy (one set of classes, whichever path vLLM was given)."""

import sys

from .mooncake import connector

sys.modules[__name__] = connector
