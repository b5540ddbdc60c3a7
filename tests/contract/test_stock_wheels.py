"""ds_plugins/stock.py (what a plain `pip install <engine>==<version>` brings) against the real wheels.

For every version in ci/versions.toml, ci/compat.py `stock_libraries` reads the official engine wheel
(vendored DeepGEMM headers) and the wheels it pins (FlashInfer's decode entry point and dispatch table,
sgl-deep-gemm's SM12x headers) with the probe's own rules; stock.py must say exactly the same.
"""

import pytest
from packaging.version import Version

from ci import compat, upstream
from ds_plugins import landscape, stock

pytestmark = pytest.mark.contract

MATRIX = upstream.matrix()


def _facts(libs):
    return {name: (lib.present, lib.version, tuple(sorted(lib.features))) for name, lib in libs.items()}


@pytest.mark.parametrize("engine,version", MATRIX, ids=[f"{e}-{v}" for e, v in MATRIX])
def test_stock_data_is_what_the_wheels_ship(engine, version):
    wheels = compat.stock_libraries(engine, version)
    assert _facts(stock.libraries(engine, version)) == _facts(wheels), (
        f"ds_plugins/stock.py disagrees with the {engine} {version} wheel and the wheels it pins"
    )
    assert stock.torch(engine, version) == compat.stock_torch(engine, version)
    assert stock.checked(engine, version) == version


@pytest.mark.parametrize("engine", sorted(upstream.versions()))
def test_ranges_are_the_matrix_cut_at_checked_versions(engine):
    """Each range starts at a checked version, ranges follow each other without gap or overlap up to an
    open end, and each range's `checked` is exactly the matrix versions inside it."""
    matrix = sorted(upstream.versions()[engine]["matrix"], key=Version)
    wheels = [w for w in stock.WHEELS if w.engine == engine]
    assert wheels, f"stock.py has nothing for {engine}"
    bounds = [w.versions.split(",") for w in wheels]
    assert bounds[0][0] == f">={matrix[0]}", "the first range must start at the oldest checked version"
    for this, nxt in zip(bounds, bounds[1:]):
        assert len(this) == 2 and this[1] == "<" + nxt[0][2:], f"{this} is not followed by its upper edge: {nxt}"
    assert len(bounds[-1]) == 1, "the newest range must be open-ended (newer versions are assumed like it)"
    for w in wheels:
        inside = [v for v in matrix if w.holds(v)]
        assert list(w.checked) == inside, f"{w.versions}: checked {w.checked}, matrix versions inside {inside}"
        assert w.versions.split(",")[0] == f">={w.checked[0]}"
    assert max((c for w in wheels for c in w.checked), key=Version) == landscape.NEWEST_TESTED[engine]


def test_every_library_the_wheels_can_bring_is_one_the_catalogue_knows():
    assert set(upstream.LIBRARY_OF_DIST.values()) | {stock.VENDORED_DEEP_GEMM} <= set(stock.FEATURES)
    for w in stock.WHEELS:
        for lib in w.libraries:
            assert set(lib.features) <= set(stock.FEATURES[lib.name]), (w.versions, lib)
            assert stock.VENDORED_BY.get(lib.name, w.engine) == w.engine, (w.versions, lib)


def test_pins_are_read_with_extras_and_markers_and_a_loose_kernel_pin_is_refused(tmp_path):
    (tmp_path / "METADATA").write_text(
        "\n".join(
            [
                "Name: someengine",
                "Requires-Dist: flashinfer_python[cu13]==0.6.12",
                "Requires-Dist: torch==2.11.0",
                'Requires-Dist: mooncake-transfer-engine==0.3; extra == "pd"',
                'Requires-Dist: triton==3.0; sys_platform == "darwin"',
                "Requires-Dist: numpy>=2",
            ]
        )
        + "\n"
    )
    assert upstream.wheel_pins(tmp_path) == {"flashinfer-python": "0.6.12", "torch": "2.11.0"}
    (tmp_path / "METADATA").write_text("Name: someengine\nRequires-Dist: sgl-deep-gemm>=0.2\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        upstream.wheel_pins(tmp_path)
