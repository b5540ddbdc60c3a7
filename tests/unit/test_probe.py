import importlib.metadata as md
import json
import subprocess
import sys

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


def test_torch_cuda_version_from_version_py(tmp_path):
    (tmp_path / "version.py").write_text("__version__ = '2.13.0+cu130'\ncuda: Optional[str] = '13.0'\n")
    assert probe.torch_cuda_version(tmp_path) == "13.0"
    (tmp_path / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    assert probe.torch_cuda_version(tmp_path) is None


def test_cuda_visible_devices_by_index_and_uuid_prefix():
    assert probe.visible(["1", "3"], 3, "GPU-aaaa")
    assert not probe.visible(["1", "3"], 0, "GPU-aaaa")
    assert probe.visible(["GPU-ab12"], 5, "GPU-ab12cd34-0000")
    assert not probe.visible(["GPU-ffff"], 5, "GPU-ab12cd34")


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
        assert found.engines.get(engine) == expected
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
