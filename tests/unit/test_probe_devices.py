"""The whole NVML path of the probe, with a fake NVML module standing in for nvidia-ml-py.

The fake has nvidia-ml-py's function names and error type; everything after it (CUDA order,
CUDA_VISIBLE_DEVICES in every form, MIG, notes, doctor's JSON) is the real code.
"""

import json

import pytest

from ds_plugins import doctor, probe
from ds_plugins.probe import Host

A, B, C, D = (f"GPU-{c * 8}-1111-2222-3333-444444444444" for c in "abcd")
MIG_C = ("MIG-c0c0c0c0-0000-5555-6666-777777777777", "MIG-c1c1c1c1-0000-5555-6666-777777777777")


class FakeNVML:
    """NVML as nvidia-ml-py exposes it; GPUs in PCI bus order (NVML's order)."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    def __init__(self, gpus, fail_init=False):
        self.gpus = gpus  # list of dicts: uuid, name, cap, cores, mig (list of uuids or None)
        self.fail_init = fail_init
        self.initialised = 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def _gpu(self, handle):
        return self.gpus[handle[1]]

    def nvmlDeviceGetUUID(self, handle):
        if handle[0] == "mig":
            return self.gpus[handle[1]]["mig"][handle[2]].encode()
        return self._gpu(handle)["uuid"].encode()  # older bindings return bytes

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle)["name"]

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return self._gpu(handle)["cap"]

    def nvmlDeviceGetNumGpuCores(self, handle):
        cores = self._gpu(handle).get("cores")
        if cores is None:
            raise self.NVMLError("Not Supported")
        return cores

    def nvmlDeviceGetMigMode(self, handle):
        mig = self._gpu(handle).get("mig")
        if mig is None:
            raise self.NVMLError("Not Supported")
        return (1 if mig else 0, 1 if mig else 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, i):
        mig = self._gpu(handle)["mig"]
        if i >= len(mig):
            raise self.NVMLError("Not Found")
        return ("mig", handle[1], i)


def _box(*gpus):
    return [dict(uuid=u, name=n, cap=c, cores=k, mig=m) for u, n, c, k, m in gpus]


PRO6000 = "NVIDIA RTX PRO 6000 Blackwell Workstation Edition"
FOUR_PRO6000 = _box(*((u, PRO6000, (12, 0), 24064, None) for u in (A, B, C, D)))
MIXED = _box(
    (A, "NVIDIA GeForce RTX 3090", (8, 6), 10496, None),
    (B, PRO6000, (12, 0), 24064, None),
    (C, "NVIDIA H100 80GB HBM3", (9, 0), 16896, list(MIG_C)),
)


def _probe(gpus, **env):
    fake = FakeNVML(gpus)
    host = Host(lambda: fake, lambda: True, lambda: [])
    found, note = probe.devices(env, host)
    assert fake.initialised == 0  # always shut down
    return found, note


def _uuids(found):
    return [d.uuid for d in found]


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, [A, B, C, D]),
        ("0", [A]),
        ("0,1", [A, B]),
        (" 2 , 0 ", [C, A]),
        ("3,0", [D, A]),
        (B, [B]),
        (C[:12], [C]),  # a unique UUID prefix
        (f"1,{D}", [B, D]),
        ("0,1,", [A, B]),  # a trailing comma
        ("1,7,0", [B]),  # CUDA stops at the first entry it cannot resolve
        ("1,1,0", [B]),  # and at a repeat
        ("GPU-", []),  # a prefix matching every GPU is not unique
    ],
)
def test_cuda_visible_devices_forms(value, expected):
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    found, note = _probe(FOUR_PRO6000, **env)
    assert _uuids(found) == expected
    assert [d.index for d in found] == list(range(len(expected)))  # CUDA's numbering after the mask
    assert all(d.capability == (12, 0) and d.kind == "cuda" for d in found)
    if value in ("1,7,0", "1,1,0", "GPU-"):
        assert "CUDA ignores it" in note
    elif expected:
        assert note == f"{len(expected)} GPU(s) via NVML"


@pytest.mark.parametrize("value", ["", "  ", "-1"])
def test_cuda_visible_devices_that_hide_everything(value):
    fake = FakeNVML(FOUR_PRO6000)
    found, note = probe.devices({"CUDA_VISIBLE_DEVICES": value}, Host(lambda: fake, lambda: True, lambda: []))
    assert found == () and "hides every GPU" in note and fake.initialised == 0


def test_mig_devices_by_uuid_and_legacy_form():
    found, _ = _probe(MIXED, CUDA_VISIBLE_DEVICES=MIG_C[1], CUDA_DEVICE_ORDER="PCI_BUS_ID")
    assert [(d.uuid, d.capability, d.name) for d in found] == [(MIG_C[1], (9, 0), "NVIDIA H100 80GB HBM3 MIG")]
    legacy = f"MIG-{C}/1/0"
    found, _ = _probe(MIXED, CUDA_VISIBLE_DEVICES=legacy, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    assert [(d.uuid, d.capability) for d in found] == [(legacy, (9, 0))]
    found, note = _probe(MIXED, CUDA_VISIBLE_DEVICES="MIG-ffff")
    assert found == () and "not a GPU here" in note


def test_cuda_device_order():
    pci, _ = _probe(MIXED, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    assert [d.capability for d in pci] == [(8, 6), (12, 0), (9, 0)]
    fastest, note = _probe(MIXED)  # CUDA's default FASTEST_FIRST
    assert [d.capability for d in fastest] == [(12, 0), (9, 0), (8, 6)] and "FASTEST_FIRST" in note
    # indices refer to CUDA's order, not NVML's
    first, _ = _probe(MIXED, CUDA_VISIBLE_DEVICES="0")
    assert [d.uuid for d in first] == [B]


def test_no_driver_no_binding_and_nvml_failure():
    assert probe.devices({}, Host(lambda: FakeNVML([]), lambda: False, lambda: []))[1] == "no NVIDIA driver loaded"

    def missing():
        raise ImportError("No module named 'pynvml'")

    assert "nvidia-ml-py" in probe.devices({}, Host(missing, lambda: True, lambda: []))[1]
    broken = FakeNVML(FOUR_PRO6000, fail_init=True)
    found, note = probe.devices({}, Host(lambda: broken, lambda: True, lambda: []))
    assert found == () and "NVML failed to initialise: Driver Not Loaded" in note


def test_npus_from_device_files():
    host = Host(lambda: FakeNVML([]), lambda: False, lambda: ["davinci3", "davinci0", "davinci_manager", "tty"])
    found, _ = probe.devices({"ASCEND_RT_VISIBLE_DEVICES": "3"}, host)
    assert [(d.kind, d.index) for d in found] == [("npu", 0)]
    assert len(probe.devices({}, host)[0]) == 2


def test_doctor_json_lists_visible_gpus_in_cuda_order():
    fake = FakeNVML(FOUR_PRO6000)
    found = probe.probe({"CUDA_VISIBLE_DEVICES": "3,0"}, Host(lambda: fake, lambda: True, lambda: []))
    report = json.loads(json.dumps(doctor.build(found, env={})))
    assert [(d["index"], d["uuid"], d["capability"]) for d in report["probe"]["devices"]] == [
        (0, D, [12, 0]),
        (1, A, [12, 0]),
    ]
    assert "RTX PRO 6000" in doctor.render(report)
