"""How the visible GPUs are connected (Probe.gpu_links), read through the NVML seam with a fake NVML module.

The fake adds nvidia-ml-py's P2P status query (nvmlDeviceGetP2PStatus with NVML_P2P_CAPS_INDEX_NVLINK) to the
device fake of test_probe_devices; everything after it (CUDA order, CUDA_VISIBLE_DEVICES, the pair queries,
the Probe, doctor) is the real code. "pcie" must come only from NVML saying "no NVLink" for every pair.
"""

import json

from ds_plugins import doctor, probe
from ds_plugins.probe import Host, Probe
from tests.unit.test_probe_devices import A, B, C, D, MIG_C, PRO6000, FakeNVML, _box

# nvidia-ml-py's values (pynvml.NVML_P2P_CAPS_INDEX_NVLINK == 2, NVML_P2P_STATUS_OK == 0; other statuses are
# "not supported" reasons, e.g. NVML_P2P_STATUS_NOT_SUPPORTED == 5).
NVLINK_INDEX, STATUS_OK, NOT_SUPPORTED = 2, 0, 5


class FakeNVMLWithP2P(FakeNVML):
    NVML_P2P_CAPS_INDEX_NVLINK = NVLINK_INDEX
    NVML_P2P_STATUS_OK = STATUS_OK

    def __init__(self, gpus, nvlink=(), p2p_error=None):
        super().__init__(gpus)
        self.nvlink = {frozenset(pair) for pair in nvlink}  # NVML indices of NVLink-connected pairs
        self.p2p_error = p2p_error
        self.queries = []

    def nvmlDeviceGetP2PStatus(self, a, b, index):
        assert self.initialised == 1, "queried outside an NVML session"
        if self.p2p_error:
            raise self.NVMLError(self.p2p_error)
        self.queries.append((a[1], b[1], index))
        if index != NVLINK_INDEX:
            return NOT_SUPPORTED
        return STATUS_OK if frozenset((a[1], b[1])) in self.nvlink else NOT_SUPPORTED


FOUR = _box(*((u, PRO6000, (12, 0), 24064, None) for u in (A, B, C, D)))


def _links(fake, **env):
    found, _note, links = probe.devices_and_links(env, Host(lambda: fake, lambda: True, lambda: []))
    assert fake.initialised == 0  # always shut down
    return found, links


def test_an_nvlink_pair_and_a_pcie_pair():
    fake = FakeNVMLWithP2P(FOUR[:2], nvlink=[(0, 1)])
    found, links = _links(fake)
    assert len(found) == 2 and links.kind == probe.LINK_NVLINK and "NVLink between every pair" in links.note
    assert fake.queries == [(0, 1, NVLINK_INDEX)]
    fake = FakeNVMLWithP2P(FOUR[:2])
    found, links = _links(fake)
    assert len(found) == 2 and links.kind == probe.LINK_PCIE and "no NVLink" in links.note
    assert fake.queries == [(0, 1, NVLINK_INDEX)]


def test_one_visible_gpu_asks_nothing():
    fake = FakeNVMLWithP2P(FOUR, nvlink=[(0, 1)])
    found, links = _links(fake, CUDA_VISIBLE_DEVICES="2")
    assert len(found) == 1 and links.kind == probe.LINK_SINGLE and fake.queries == []
    _, links = _links(FakeNVMLWithP2P(FOUR), CUDA_VISIBLE_DEVICES="-1")
    assert links.kind == probe.LINK_SINGLE


def test_the_pairs_are_the_visible_gpus_in_cuda_order():
    # NVLink bridges 0-1 and 2-3 (NVML indices); CUDA_VISIBLE_DEVICES picks which physical GPUs are paired
    fake = FakeNVMLWithP2P(FOUR, nvlink=[(0, 1), (2, 3)])
    assert _links(fake, CUDA_VISIBLE_DEVICES="1,0")[1].kind == probe.LINK_NVLINK
    assert _links(fake, CUDA_VISIBLE_DEVICES="1,2")[1].kind == probe.LINK_PCIE
    assert _links(fake, CUDA_VISIBLE_DEVICES=f"{D},{C}")[1].kind == probe.LINK_NVLINK
    fake.queries.clear()
    _, links = _links(fake, CUDA_VISIBLE_DEVICES="0,1,2")
    assert links.kind == probe.LINK_MIXED and "1 of 3 pairs" in links.note
    assert len(fake.queries) == 3
    assert {frozenset(q[:2]) for q in fake.queries} == {frozenset((0, 1)), frozenset((0, 2)), frozenset((1, 2))}
    assert _links(fake)[1].kind == probe.LINK_MIXED  # all four: 2 of 6 pairs


def test_fastest_first_order_maps_to_the_right_nvml_gpus():
    # NVML order: a slow GPU first; CUDA's default order puts the two SM120 GPUs (NVML 1, 2) first
    box = _box(
        (A, "NVIDIA GeForce RTX 3090", (8, 6), 10496, None),
        (B, PRO6000, (12, 0), 24064, None),
        (C, PRO6000, (12, 0), 24064, None),
    )
    fake = FakeNVMLWithP2P(box, nvlink=[(1, 2)])
    found, links = _links(fake, CUDA_VISIBLE_DEVICES="0,1")
    assert [d.uuid for d in found] == [B, C] and links.kind == probe.LINK_NVLINK
    assert fake.queries == [(1, 2, NVLINK_INDEX)]


def test_an_nvml_error_is_unknown_never_pcie():
    fake = FakeNVMLWithP2P(FOUR[:2], p2p_error="Unknown Error")
    found, links = _links(fake)
    assert len(found) == 2  # the devices are still listed
    assert links.kind == probe.LINK_UNKNOWN and "Unknown Error" in links.note


def test_a_binding_without_the_p2p_query_is_unknown():
    fake = FakeNVML(FOUR[:2])  # nvidia-ml-py without nvmlDeviceGetP2PStatus / its constants
    found, _note, links = probe.devices_and_links({}, Host(lambda: fake, lambda: True, lambda: []))
    assert len(found) == 2 and links.kind == probe.LINK_UNKNOWN and "nvmlDeviceGetP2PStatus" in links.note


def test_no_binding_no_driver_and_a_failed_init_are_unknown():
    def missing():
        raise ImportError("No module named 'pynvml'")

    assert probe.devices_and_links({}, Host(missing, lambda: True, lambda: []))[2].kind == probe.LINK_UNKNOWN
    assert probe.devices_and_links({}, Host(missing, lambda: False, lambda: []))[2].kind == probe.LINK_UNKNOWN
    broken = FakeNVMLWithP2P(FOUR)
    broken.fail_init = True
    _, _, links = probe.devices_and_links({}, Host(lambda: broken, lambda: True, lambda: []))
    assert links.kind == probe.LINK_UNKNOWN and "Driver Not Loaded" in links.note


def test_mig_devices_are_unknown():
    h100 = "NVIDIA H100 80GB HBM3"
    box = _box((C, h100, (9, 0), 16896, list(MIG_C)), (D, h100, (9, 0), 16896, None))
    fake = FakeNVMLWithP2P(box, nvlink=[(0, 1)])
    _, links = _links(fake, CUDA_VISIBLE_DEVICES=f"{MIG_C[0]},{D}")
    assert links.kind == probe.LINK_UNKNOWN and "MIG" in links.note and fake.queries == []


def test_the_probe_carries_it_to_doctor_and_back():
    fake = FakeNVMLWithP2P(FOUR[:2])
    found = probe.probe({}, Host(lambda: fake, lambda: True, lambda: []))
    assert (found.gpu_links, found.gpu_links_note) == (
        probe.LINK_PCIE,
        "NVML: no NVLink between the 2 visible GPUs, PCIe only",
    )
    data = json.loads(json.dumps(found.to_dict()))
    assert data["gpu_links"] == "pcie" and Probe.from_dict(data) == found
    text = doctor.render(doctor.build(found, env={}))
    assert "gpu links    pcie (NVML: no NVLink between the 2 visible GPUs, PCIe only)" in text
    # a probe written before the field existed reads as unknown
    old = {k: v for k, v in data.items() if not k.startswith("gpu_links")}
    assert Probe.from_dict(old).gpu_links == probe.LINK_UNKNOWN
