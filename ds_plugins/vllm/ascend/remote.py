"""A msModelSlim checkpoint given to `vllm serve` as a hub id: what is fetched, from which hub, and when.

While vLLM builds its config (`maybe_update_config`, in the API server process) only the JSON files the early
checks read are fetched, one file each: the description (required), config.json and the safetensors index
(where the repository has them); they get the checks JSON allows (ds_plugins.quant.ascend.loader.check_json),
the rest runs on the fetched weights (loader.Checkpoint) before vLLM places one.
The weights are fetched when the model is built (the first layer asks for
its method, in the worker, right before vLLM's own loader would fetch them), through vLLM's own download
functions with vLLM's download directory, so vLLM's loader then finds them in its cache and fetches nothing
twice. The hub is the one vLLM uses: ModelScope when `vllm.envs.VLLM_USE_MODELSCOPE` is set, else the
Hugging Face Hub; HF_HUB_OFFLINE makes both read their local caches only, as vLLM does (for a Hugging Face id
vLLM then swaps the id for its cached snapshot folder before building its config, so it arrives here local).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from ...quant.ascend.description import FILENAME
from ...quant.ascend.layout import CONFIG

logger = logging.getLogger("vllm.ds_plugins")

# Index names msModelSlim's saver (quant_model_weights) and transformers' (model) write.
INDEX_NAMES = ("quant_model_weights.safetensors.index.json", "model.safetensors.index.json")
OPTIONAL = (CONFIG, *INDEX_NAMES)
# What the weight download fetches: the tensors and the JSON beside them (in the same snapshot folder).
WEIGHT_PATTERNS = ["*.safetensors", "*.json"]


def use_modelscope() -> bool:
    from vllm import envs

    return bool(envs.VLLM_USE_MODELSCOPE)


def _offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _modelscope_download():
    try:
        return importlib.import_module("modelscope.hub.file_download").model_file_download
    except ImportError:
        raise ValueError(
            "--quantization ascend: VLLM_USE_MODELSCOPE is set, so the checkpoint comes from "
            "ModelScope, but the modelscope package is not installed (pip install modelscope)"
        ) from None


def _fetch_one(model: str, revision: str | None, name: str) -> Path | None:
    """One file of the repository, or None where it has no such file (a missing repo or revision raises)."""
    if use_modelscope():
        download = _modelscope_download()
        try:
            return Path(download(model_id=model, file_path=name, revision=revision, local_files_only=_offline()))
        except Exception as exc:  # modelscope's own NotExistError / HTTPError family; the description fetched
            if name == FILENAME:
                raise
            logger.debug("ds-plugins: %s of %s not fetched from ModelScope (%s)", name, model, exc)
            return None
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.hf_hub_download(model, name, revision=revision, local_files_only=_offline()))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        if name == FILENAME:
            raise
        return None


def fetch_json(model: str, revision: str | None) -> Path:
    """The folder holding the description, and config.json / the index where the repository has them."""
    hub = "ModelScope" if use_modelscope() else "the Hugging Face Hub"
    if use_modelscope():
        _modelscope_download()  # the clear error where modelscope is missing, before any other
    got, folder = [], None
    for name in (FILENAME, *OPTIONAL):
        try:
            path = _fetch_one(model, revision, name)
        except Exception as exc:  # the hub client's own errors: one line naming the file, the id and the hub
            raise ValueError(
                f"--quantization ascend: could not fetch {name} of {model!r} from {hub} ({type(exc).__name__}: {exc})"
            ) from None
        if path is not None:
            got.append(name)
            folder = folder or path.parent
    logger.info("ds-plugins: fetched %s of %s from %s (the weights load with the model)", ", ".join(got), model, hub)
    return folder  # type: ignore[return-value]  # set: FILENAME, fetched first, is a Path or raises


def fetch_weights(model: str, revision: str | None, download_dir: str | None) -> Path:
    """The local snapshot folder with the checkpoint's safetensors and JSON, through vLLM's own downloaders."""
    from vllm.model_executor.model_loader import weight_utils

    if use_modelscope():
        _modelscope_download()  # the clear error where modelscope is missing
        path = weight_utils.maybe_download_from_modelscope(
            model, revision=revision, download_dir=download_dir, allow_patterns=WEIGHT_PATTERNS
        )
    else:
        path = weight_utils.download_weights_from_hf(model, download_dir, WEIGHT_PATTERNS, revision=revision)
    return Path(path)
