"""A msModelSlim checkpoint named by hub id (ds_plugins/vllm/ascend/remote.py), on the real vLLM of the test
environment and the real huggingface_hub, against a local hub cache (HF_HUB_OFFLINE, the cache layout
huggingface_hub itself reads): while vLLM builds its config only the JSON files are requested, one by one, and
the weights are fetched (through vLLM's own download_weights_from_hf) only when the first layer asks for its
method. ModelScope, which vLLM uses when VLLM_USE_MODELSCOPE is set, gets the same requests; without the
modelscope package the error is one line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from ds_plugins.quant.ascend.errors import AscendFormatError  # noqa: E402
from tests.quant.fixtures import layer_checkpoint  # noqa: E402

REPO, COMMIT = "org/tiny-w8a8", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding REPO's JSON files only (the weights are added by `add_weights`), the hub
    offline, and every hf_hub_download call recorded."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    ckpt = layer_checkpoint(tmp_path / "ckpt") and tmp_path / "ckpt"
    (ckpt / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "num_hidden_layers": 1}))
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in ckpt.glob("*.json"):
        shutil.copy(f, snap / f.name)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("VLLM_USE_MODELSCOPE", raising=False)
    asked: list[str] = []
    real = huggingface_hub.hf_hub_download

    def recording(repo_id, filename, **kw):
        asked.append(filename)
        return real(repo_id, filename, cache_dir=str(cache), **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)

    def add_weights():
        for f in ckpt.glob("*.safetensors"):
            shutil.copy(f, snap / f.name)

    return types.SimpleNamespace(asked=asked, snap=snap, ckpt=ckpt, add_weights=add_weights, cache=cache)


def _config():
    from ds_plugins.vllm.ascend.config import AscendQuantConfig

    return AscendQuantConfig()


def test_remote_id_fetches_only_json_while_the_config_is_built(hub, monkeypatch):
    from vllm.model_executor.model_loader import weight_utils

    cfg = _config()
    cfg.maybe_update_config(REPO, hf_config=None, revision=None)  # the weights are not in the cache yet
    assert hub.asked and all(name.endswith(".json") for name in hub.asked), hub.asked
    assert hub.asked[0] == "quant_model_description.json"
    assert cfg.checkpoint is None
    hub.add_weights()  # what the hub has: vLLM's own downloader finds it when the model is built
    patterns = []
    real = weight_utils.download_weights_from_hf

    def recording(model, cache_dir, allow_patterns, **kw):
        patterns.append((model, cache_dir, list(allow_patterns)))
        return real(model, str(hub.cache), allow_patterns, **kw)

    monkeypatch.setattr(weight_utils, "download_weights_from_hf", recording)
    import vllm.platforms as platforms
    from vllm.config import LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.setattr(platforms, "_current_platform", CpuPlatform())  # the CUDA wheel finds no GPU here
    with set_current_vllm_config(VllmConfig(load_config=LoadConfig(download_dir=str(hub.cache / "dl")))):
        assert cfg.scheme_for("layers.0.attn.wq_a") == "W8A8_DYNAMIC"  # model construction asks, in this context
    assert patterns == [(REPO, str(hub.cache / "dl"), ["*.safetensors", "*.json"])], patterns  # vLLM's --download-dir
    assert Path(cfg.checkpoint.directory) == hub.snap


def test_a_bad_description_is_refused_from_the_json_alone(hub):
    data = json.loads((hub.snap / "quant_model_description.json").read_text())
    data["layers.0.attn.wq_a.weight"] = "W9A9"
    (hub.snap / "quant_model_description.json").write_text(json.dumps(data))
    with pytest.raises(AscendFormatError, match="W9A9"):
        _config().maybe_update_config(REPO)
    assert all(name.endswith(".json") for name in hub.asked), hub.asked


def test_the_index_is_checked_against_the_description_from_the_json_alone(hub):
    """A tensor the description lists but the index does not (and the reverse) stops the config build, before
    any safetensors file is requested."""
    index = hub.snap / "quant_model_weights.safetensors.index.json"
    data = json.loads(index.read_text())
    key = "layers.0.attn.wkv.weight_scale"
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    with pytest.raises(
        AscendFormatError,
        match=r"listed in the description but not in the safetensors index "
        r"\(quant_model_weights.safetensors.index.json\)",
    ) as info:
        _config().maybe_update_config(REPO)
    assert info.value.key == key and info.value.file.endswith("quant_model_description.json")
    data["weight_map"][key] = data["weight_map"]["layers.0.attn.wq_a.weight"]
    data["weight_map"]["layers.0.attn.wq_b.weight"] = data["weight_map"][key]
    index.write_text(json.dumps(data))
    with pytest.raises(AscendFormatError, match="the index lists this tensor but") as info:
        _config().maybe_update_config(REPO)
    assert info.value.key == "layers.0.attn.wq_b.weight" and info.value.file == str(index)
    assert all(name.endswith(".json") for name in hub.asked), hub.asked


def test_layers_beyond_config_json_are_refused_from_the_json_alone(hub):
    (hub.snap / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "num_hidden_layers": 0}))
    with pytest.raises(AscendFormatError, match=r"layer 0 does not exist: .*config.json has num_hidden_layers=0"):
        _config().maybe_update_config(REPO)
    assert all(name.endswith(".json") for name in hub.asked), hub.asked


def test_a_repo_without_the_description_is_one_clear_line(hub):
    (hub.snap / "quant_model_description.json").unlink()
    with pytest.raises(
        ValueError,
        match=r"could not fetch quant_model_description.json of 'org/tiny-w8a8' from "
        r"the Hugging Face Hub \(LocalEntryNotFoundError",
    ):
        _config().maybe_update_config(REPO)


# The real ModelScope client (modelscope and the modelscope-hub package it is built on), installed once
# beside the test environment (not into it: vLLM does not depend on it) under ds-plugins' cache.
MODELSCOPE = ("modelscope==1.40.2", "modelscope-hub==0.5.1")


@pytest.fixture(scope="session")
def modelscope_site():
    from ci.upstream import cache_dir

    target = cache_dir() / "overlays" / "-".join(p.replace("==", "-") for p in MODELSCOPE)
    if not (target / ".complete").exists():
        if target.exists():
            shutil.rmtree(target)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *MODELSCOPE],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode:
            msg = f"could not install {' '.join(MODELSCOPE)}: {proc.stderr[-2000:]}"
            if os.environ.get("DSP_REQUIRE_ENGINES") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
        (target / ".complete").touch()
    return target


def test_modelscope_when_vllm_is_told_to_use_it(hub, modelscope_site, tmp_path, monkeypatch):
    """With VLLM_USE_MODELSCOPE the real ModelScope client is asked, offline against its own cache layout
    (`<cache>/models/<owner>--<name>/snapshots/<revision>/`): the JSON files one by one while the config is
    built, the weights through vLLM's own maybe_download_from_modelscope when the model is built."""
    from vllm import envs

    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "1")
    assert envs.VLLM_USE_MODELSCOPE  # vLLM's own reading of the switch
    cache = tmp_path / "modelscope"
    snap = cache / "models" / REPO.replace("/", "--") / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in hub.snap.glob("*.json"):
        shutil.copy(f, snap / f.name)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(modelscope_site))
    import modelscope.hub.file_download as msfd

    asked = []
    real = msfd.model_file_download

    def recording(model_id, file_path, revision=None, **kw):
        asked.append((model_id, file_path, revision, kw.get("local_files_only")))
        return real(model_id, file_path, revision, **kw)

    monkeypatch.setattr(msfd, "model_file_download", recording)
    cfg = _config()
    cfg.maybe_update_config(REPO, revision=COMMIT)  # a pinned revision: offline, ModelScope asks no server
    assert hub.asked == [], "the Hugging Face Hub was asked although vLLM uses ModelScope"
    assert asked and asked[0][1] == "quant_model_description.json", asked
    assert all(a[0] == REPO and a[1].endswith(".json") and a[2] == COMMIT and a[3] for a in asked), asked
    assert cfg.checkpoint is None
    for f in hub.ckpt.glob("*.safetensors"):
        shutil.copy(f, snap / f.name)
    import vllm.platforms as platforms
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.setattr(platforms, "_current_platform", CpuPlatform())
    with set_current_vllm_config(VllmConfig()):
        assert cfg.scheme_for("layers.0.attn.wq_a") == "W8A8_DYNAMIC"
    assert Path(cfg.checkpoint.directory).resolve() == snap.resolve()
    assert hub.asked == []


def test_modelscope_missing_is_one_clear_line(hub, monkeypatch):
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "1")
    monkeypatch.setitem(sys.modules, "modelscope.hub.file_download", None)  # import fails as if not installed
    with pytest.raises(
        ValueError,
        match=r"VLLM_USE_MODELSCOPE is set.*modelscope package is not installed "
        r"\(pip install modelscope\)",
    ):
        _config().maybe_update_config(REPO)
    assert hub.asked == []


def test_local_directory_is_checked_whole_at_once(hub):
    hub.add_weights()
    cfg = _config()
    cfg.maybe_update_config(str(hub.snap))
    assert cfg.checkpoint is not None and hub.asked == []
