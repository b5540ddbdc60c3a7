"""The upstream-compat table, docs/compat.md, generated from the matrix in ci/versions.toml.

Every cell comes from something checked: the landscape facts and what each stock wheel ships
(ds_plugins/landscape.py and ds_plugins/stock.py, each verified against the version's wheel by
tests/contract; `stock_libraries` below is that evidence for stock.py), and the policy's decisions for
a stock install of that version on each GPU class.

It also renders the path manifests (ds_plugins/paths/) into docs/paths/<engine>.md.

    python ci/compat.py write    # regenerate docs/compat.md and docs/paths/*.md
    python ci/compat.py check    # exit 1 if any of them is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci import upstream  # noqa: E402
from ci.upstream_facts import deep_gemm_sm12x, files, flashinfer_sm120_sparse_mla  # noqa: E402
from ds_plugins import landscape, stock  # noqa: E402
from ds_plugins.patching import Patch  # noqa: E402
from ds_plugins.policy import decide  # noqa: E402
from ds_plugins.probe import Device, Library, Probe  # noqa: E402

DOC = upstream.ROOT / "docs" / "compat.md"
GPUS = {"SM90": (9, 0), "SM100": (10, 0), "SM120": (12, 0), "SM121": (12, 1)}
KERNEL_DECISIONS = ("deepgemm", "sparse_mla", "indexer", "cudagraph", "dsv4_model")


def stock_libraries(engine: str, version: str) -> dict[str, Library]:
    """The kernel libraries a plain `pip install <engine>==<version>` brings, as the probe would see them,
    read from the engine's wheel and the wheels it pins: the evidence ds_plugins/stock.py is checked against
    (tests/contract/test_stock_wheels.py). Locations and notes are left empty."""
    src = upstream.source(engine, version)
    libs: dict[str, Library] = {}
    if engine == "vllm" and any(n.startswith("vllm/third_party/deep_gemm/") for n in files(src)):
        has = deep_gemm_sm12x(src, "vllm/third_party/deep_gemm")
        libs["vllm.third_party.deep_gemm"] = Library(
            "vllm.third_party.deep_gemm", True, version, None, ("sm12x",) if has else ()
        )
    for dist, pinned in upstream.wheel_pins(src).items():
        name = upstream.LIBRARY_OF_DIST.get(dist)
        if name is None:
            continue
        lib_src = upstream.source(dist, pinned)
        if not any(n.startswith(f"{name}/") for n in files(lib_src)):
            raise ValueError(f"{dist} {pinned} (pinned by {engine} {version}) has no {name}/ package")
        features: tuple[str, ...] = ()
        if name == "flashinfer" and flashinfer_sm120_sparse_mla(lib_src):
            features = ("sm120_sparse_mla",)
        elif name == "deep_gemm" and deep_gemm_sm12x(lib_src, "deep_gemm"):
            features = ("sm12x",)
        if name in libs:
            raise ValueError(f"{engine} {version} pins two distributions of {name}")
        libs[name] = Library(name, True, pinned, None, features)
    return libs


def stock_torch(engine: str, version: str) -> str | None:
    """The torch version the engine's wheel pins."""
    return upstream.wheel_pins(upstream.source(engine, version)).get("torch")


def _declared(engine: str) -> list[Patch]:
    from ds_plugins.doctor import declared_patches

    return declared_patches(engine)


def decisions_cell(engine: str, version: str, gpu: str) -> str:
    probe = Probe(
        "",
        {engine: version},
        None,
        None,
        (Device("cuda", 0, gpu, GPUS[gpu]),),
        "",
        stock.libraries(engine, version),
        simulated=True,
    )
    plan = decide(probe, engine, env={})
    if plan.status != "supported":
        return "unsupported"
    served = {(p.implements[0], v) for p in _declared(engine) if p.covers(version) for v in p.implements[1]}
    active = [d for d in plan.decisions if d.id in KERNEL_DECISIONS and d.active]
    if not active:
        return "upstream"
    return ", ".join(f"{d.id}={d.value}" + ("" if (d.id, d.value) in served else "†") for d in active)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _fact(engine: str, fact_id: str, version: str) -> bool:
    return fact_id in landscape.facts_for(engine, version)


def _checked(engine: str, version: str) -> str:
    live = version in upstream.versions()[engine]["live"]
    return "wheel source + installed" if live else "wheel source"


def vllm_rows(versions: list[str]) -> list[str]:
    head = (
        "| vLLM | torch | checked | DeepSeek-V4 | V4 attention on SM12x | DeepGEMM gate on SM12x "
        "| vendored DeepGEMM SM12x kernels | pinned FlashInfer SM120 decode | SM90 / SM100 | SM120 | SM121 |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in versions:
        libs = stock.libraries("vllm", v)
        vendored = libs.get("vllm.third_party.deep_gemm")
        fi = libs.get("flashinfer")
        sm90 = decisions_cell("vllm", v, "SM90")
        sm100 = decisions_cell("vllm", v, "SM100")
        rows.append(
            "| "
            + " | ".join(
                [
                    v,
                    stock.torch("vllm", v) or "—",
                    _checked("vllm", v),
                    _yes(_fact("vllm", "dsv4_model", v)),
                    "FlashInfer SM120" if _fact("vllm", "sm12x_dsv4_attention", v) else "none",
                    "on" if _fact("vllm", "deepgemm_gate_sm12x", v) else "off",
                    "—" if vendored is None else _yes(vendored.has("sm12x")),
                    "—" if fi is None else f"{_yes(fi.has('sm120_sparse_mla'))} ({fi.version})",
                    sm90 if sm90 == sm100 else f"{sm90} / {sm100}",
                    decisions_cell("vllm", v, "SM120"),
                    decisions_cell("vllm", v, "SM121"),
                ]
            )
            + " |"
        )
    return rows


def patch_rows(engine: str, versions: list[str]) -> list[str]:
    """Which ds-plugins patches are written for each version: each one's seam is checked in that
    version's wheel source (tests/contract/test_<engine>_seams.py), and on installed versions the
    engine tests run them in real processes."""
    title = landscape.ENGINE_TITLE[engine]
    rows = [
        f"| {title} | checked | patches written for this version, by the decision that selects them |",
        "|---|---|---|",
    ]
    for v in versions:
        if not landscape.is_supported(engine, v):
            rows.append(f"| {v} | wheel source | none (no DeepSeek-V4) |")
            continue
        by_decision: dict[str, list[str]] = {}
        for p in _declared(engine):
            if p.covers(v):
                decision, values = p.implements
                key = "every plan" if decision == "*" else f"{decision}={'/'.join(values)}"
                by_decision.setdefault(key, []).append(f"`{p.id}`")
        cell = "; ".join(f"{k}: {', '.join(ids)}" for k, ids in by_decision.items()) or "none"
        rows.append(f"| {v} | {_checked(engine, v)} | {cell} |")
    return rows


def sglang_rows(versions: list[str]) -> list[str]:
    head = (
        "| SGLang | torch | checked | way in | DeepSeek-V4 | V4 attention on SM12x | DeepGEMM gate SM120 "
        "| DeepGEMM gate SM121 | pinned DeepGEMM SM12x kernels | SM90 / SM100 | SM120 | SM121 |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in versions:
        dg = stock.libraries("sglang", v).get("deep_gemm")
        plugins = _fact("sglang", "general_plugins", v)
        sm90 = decisions_cell("sglang", v, "SM90")
        sm100 = decisions_cell("sglang", v, "SM100")
        rows.append(
            "| "
            + " | ".join(
                [
                    v,
                    stock.torch("sglang", v) or "—",
                    _checked("sglang", v),
                    "entry point + hook" if plugins else "PYTHONPATH hook",
                    _yes(_fact("sglang", "dsv4_model", v)),
                    "SGLang SM120 FlashMLA" if _fact("sglang", "sm12x_dsv4_attention", v) else "none",
                    "guarded" if _fact("sglang", "deepgemm_gate_sm120_guarded", v) else "on if DeepGEMM imports",
                    "guarded" if _fact("sglang", "deepgemm_gate_sm121_guarded", v) else "on if DeepGEMM imports",
                    "—" if dg is None else f"{_yes(dg.has('sm12x'))} ({dg.version})",
                    sm90 if sm90 == sm100 else f"{sm90} / {sm100}",
                    decisions_cell("sglang", v, "SM120"),
                    decisions_cell("sglang", v, "SM121"),
                ]
            )
            + " |"
        )
    return rows


def render() -> str:
    matrix = upstream.versions()
    lines = [
        "# Upstream compatibility",
        "",
        "Generated by `python ci/compat.py write` from `ci/versions.toml`; the README test command fails "
        "when this file is stale. Do not edit by hand.",
        "",
        "Every version below was checked against its official PyPI wheel: each fact in "
        "`ds_plugins/landscape.py` is verified in that wheel's source (AST, `tests/contract/`). "
        '"installed" versions also ran the subprocess tests, where the engine\'s own plugin loader '
        "runs ds-plugins on a CPU-only machine (`tests/engines/`).",
        "",
        "The GPU columns are what ds-plugins decides for a stock install of that version "
        "(the DeepGEMM and FlashInfer its wheel vendors or pins, as `ds_plugins/stock.py` records them "
        "and `tests/contract/test_stock_wheels.py` re-reads them from the wheels; "
        "`ds-plugins doctor --simulate --engine NAME==VERSION` starts from the same): the features it takes over, "
        "each `feature=value`; `upstream` means the engine's own path serves every feature there. "
        "A dagger (†) marks a decision this build of ds-plugins does not implement yet: until it "
        "lands, the engine's own behaviour is kept. Run `ds-plugins doctor` for your own machine, or "
        "`ds-plugins doctor --simulate ...` for another.",
        "",
        f"Minimum versions with DeepSeek-V4: vLLM {landscape.MINIMUM['vllm']}, "
        f"SGLang {landscape.MINIMUM['sglang']}. Newest checked: vLLM {landscape.NEWEST_TESTED['vllm']}, "
        f"SGLang {landscape.NEWEST_TESTED['sglang']}; newer versions are treated like the newest checked.",
        "",
        "## vLLM",
        "",
        *vllm_rows(matrix["vllm"]["matrix"]),
        "",
        "Through ds-plugins or through upstream: a `feature=value` above is served by the patches below "
        "(each seam checked in that version's wheel source by `tests/contract/test_vllm_seams.py`; on "
        "installed versions `tests/engines/` also runs them in vLLM's own processes, and calls every routed "
        "kernel as vLLM does against its reference); every feature not listed stays on vLLM's own path.",
        "",
        *patch_rows("vllm", matrix["vllm"]["matrix"]),
        "",
        "## SGLang",
        "",
        *sglang_rows(matrix["sglang"]["matrix"]),
        "",
        "Through ds-plugins or through upstream, as for vLLM (seams checked by "
        "`tests/contract/test_sglang_seams.py`; `deepgemm=off|on` also sets SGLang's own "
        "`SGLANG_ENABLE_JIT_DEEPGEMM` before its gate reads it):",
        "",
        *patch_rows("sglang", matrix["sglang"]["matrix"]),
        "",
        "## Facts behind the columns",
        "",
        "| engine | fact | versions |",
        "|---|---|---|",
        *[f"| {landscape.ENGINE_TITLE[f.engine]} | {f.what} | `{f.versions}` |" for f in landscape.FACTS],
        "",
    ]
    return "\n".join(lines)


# --- the path manifests (ds_plugins/paths/), one page per engine -------------------------------

PATH_DOCS = {engine: upstream.ROOT / "docs" / "paths" / f"{engine}.md" for engine in ("vllm", "sglang")}
DEVICE_GPU = {"sm120": "SM120", "sm121": "SM121", "sm90": "SM90", "sm100": "SM100"}


def _evidence_cell(row) -> str:
    def one(ev) -> str:
        where = "member list" if ev.path == "FILES.txt" else f"`{ev.path.rsplit('/', 1)[-1]}`"
        pkg = "" if ev.package == row.engine else f"{ev.package} "
        return f"{ev.kind}: {pkg}{where}"

    return "; ".join(one(ev) for ev in row.evidence) or "—"


def _cover_cell(row) -> str:
    if row.cover is None:
        return "—"
    c = row.cover
    return f"{c.decision}={c.value}" + (f" (`{c.patch}`)" if c.patch else "")


def path_verdict(engine: str, version: str, device: str) -> str:
    """What ds-plugins decides for a stock install of `version` on that device, in one line."""
    probe = Probe(
        "",
        {engine: version},
        None,
        None,
        (Device("cuda", 0, DEVICE_GPU[device], GPUS[DEVICE_GPU[device]]),),
        "",
        stock.libraries(engine, version),
        simulated=True,
    )
    plan = decide(probe, engine, env={})
    if plan.status == "supported":
        return "**supported**"
    return f"**unsupported**: {plan.status_reason}"


def path_rows(engine: str) -> list[str]:
    from ds_plugins import paths
    from ds_plugins.paths.model import DEVICES, STAGES

    title = landscape.ENGINE_TITLE[engine]
    rows = paths.rows(engine)
    versions = [v for v in upstream.versions()[engine]["matrix"] if landscape.is_supported(engine, v)]
    lines = [
        f"# {title}: DeepSeek-V4's path, kernel by kernel",
        "",
        "Generated by `python ci/compat.py write` from `ds_plugins/paths/" + engine + ".py`; the README test "
        "command fails when this file is stale. Do not edit by hand.",
        "",
        "For each version and GPU class: every kernel DeepSeek-V4 reaches in a stock install (the libraries its "
        "wheel vendors or pins), who provides it, whether that provider has code for the architecture "
        "(`has_code`), fails there (`blocker`) or is not settled by a GPU run yet (`unverified`), the evidence "
        "`tests/contract/test_path_manifest.py` re-checks in that version's wheel, and the ds-plugins decision "
        "that covers a blocker. A blocker without its cover in the plan makes the version unsupported there; "
        "the verdict is what `ds-plugins doctor --simulate --engine " + engine + "==VERSION --capability X` says.",
        "",
    ]
    if not rows:
        return lines + ["No rows yet.", ""]
    for v in versions:
        lines += [f"## {title} {v}", ""]
        for d in DEVICES:
            here = sorted((r for r in rows if r.applies(v, d)), key=lambda r: STAGES.index(r.stage))
            lines += [f"### {v} on {DEVICE_GPU[d]}: {path_verdict(engine, v, d)}", ""]
            if not here:
                lines += ["No rows for this device class.", ""]
                continue
            lines += [
                "| stage | kernel | provider | upstream | evidence | cover | user adds |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in here:
                status = r.upstream + (f" (fixed in {r.fixed_in})" if r.fixed_in else "")
                lines.append(
                    "| "
                    + " | ".join(
                        [
                            r.stage,
                            r.kernel.replace("|", "/"),
                            r.provider,
                            status,
                            _evidence_cell(r),
                            _cover_cell(r),
                            f"`{r.requires}`" if r.requires else "—",
                        ]
                    )
                    + " |"
                )
            lines.append("")
    return lines


def render_paths(engine: str) -> str:
    return "\n".join(path_rows(engine))


def _docs() -> dict[Path, str]:
    return {DOC: render(), **{doc: render_paths(engine) for engine, doc in PATH_DOCS.items()}}


def main(argv: list[str]) -> int:
    if argv[:1] == ["write"]:
        for doc, text in _docs().items():
            doc.parent.mkdir(parents=True, exist_ok=True)
            doc.write_text(text)
            print(f"wrote {doc}")
        return 0
    if argv[:1] == ["check"]:
        stale = [doc for doc, text in _docs().items() if not doc.exists() or doc.read_text() != text]
        for doc in stale:
            print(f"{doc} is stale: run `python ci/compat.py write`", file=sys.stderr)
        return 1 if stale else 0
    print("usage: python ci/compat.py write|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
