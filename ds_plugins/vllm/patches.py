"""Every runtime patch ds-plugins applies to vLLM (each documented in patches/<id>.toml).

Empty in the foundation release: the DeepGEMM gate, the DeepSeek-V4 model hook-up
and the kernel routing arrive with their own issues, each as a declared Patch.
"""

from __future__ import annotations

from ..patching import Patch

PATCHES: tuple[Patch, ...] = ()
