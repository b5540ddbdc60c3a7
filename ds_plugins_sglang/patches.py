"""Every runtime patch ds-plugins applies to SGLang (each documented in patches/<id>.toml).

Empty in the foundation release: DeepGEMM gating and SM12x kernel routing arrive
with their own issues, each as a declared Patch.
"""

from __future__ import annotations

from ds_plugins.patching import Patch

PATCHES: tuple[Patch, ...] = ()
