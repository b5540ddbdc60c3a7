"""What each stock engine version already does for DeepSeek-V4, as version ranges.

These are the facts the policy rests on. Every one of them is re-checked against
the real upstream source of each version in `ci/versions.toml` by the contract
tests (tests/contract/), so a wrong range fails CI instead of misleading users.
"""

from __future__ import annotations

from typing import NamedTuple

from packaging.version import Version


class Fact(NamedTuple):
    id: str
    engine: str
    versions: str  # ">=A" or ">=A,<B": the releases where it holds
    what: str

    def holds(self, version: str | Version) -> bool:
        return in_range(self.versions, version, what=f"fact {self.id}")


def in_range(versions: str, version: str | Version, what: str = "range") -> bool:
    """`versions` is ">=A" or ">=A,<B" (the only forms facts and patches use); a pre- or dev release
    counts as its release. Cheaper than packaging.specifiers, which engine start-up would pay for."""
    v = release(version)
    for clause in (c.strip() for c in versions.split(",")):
        if clause.startswith(">="):
            if v < Version(clause[2:]):
                return False
        elif clause.startswith("<"):
            if v >= Version(clause[1:]):
                return False
        else:
            raise ValueError(f"{what}: unsupported range clause {clause!r} (use >=A or >=A,<B)")
    return True


def release(version: str | Version) -> Version:
    """The release a version belongs to: 0.24.0rc1 and 0.24.0.dev3+gabc count as 0.24.0."""
    return Version(Version(str(version)).base_version)


FACTS: tuple[Fact, ...] = (
    # vLLM
    Fact(
        "general_plugins",
        "vllm",
        ">=0.19",
        "vllm.general_plugins entry points run once per process (API server, engine core, workers), "
        "without a try/except around each plugin",
    ),
    Fact("dsv4_model", "vllm", ">=0.20.0", "DeepseekV4ForCausalLM and DeepSeekV4MTPModel are in vLLM's model registry"),
    Fact(
        "sm12x_dsv4_attention",
        "vllm",
        ">=0.24.0",
        "DeepSeek-V4 layers default to FlashInfer's SM120 sparse MLA on SM12x",
    ),
    Fact(
        "deepgemm_gate_sm12x",
        "vllm",
        ">=0.24.0",
        "CudaPlatform.support_deep_gemm() is true on the SM120 family (SM120 and SM121)",
    ),
    # SGLang
    Fact("general_plugins", "sglang", ">=0.5.11", "the sglang.srt.plugins entry-point group and HookRegistry exist"),
    Fact("dsv4_model", "sglang", ">=0.5.12", "SGLang ships DeepseekV4ForCausalLM and the dsv4 attention backend"),
    Fact(
        "sm12x_dsv4_attention",
        "sglang",
        ">=0.5.13",
        "SGLang has its own SM12x FlashMLA replacement and indexer path for DeepSeek-V4",
    ),
    Fact(
        "deepgemm_gate_sm120_guarded",
        "sglang",
        ">=0.5.13",
        "SGLang's DeepGEMM gate excludes (0.5.13-0.5.19) or probes (0.5.20+) DeepGEMM on SM120",
    ),
    Fact(
        "deepgemm_gate_sm121_guarded",
        "sglang",
        ">=0.5.21",
        "SGLang's DeepGEMM gate probes DeepGEMM's SM12x APIs on SM121 too",
    ),
)

# The first versions with DeepSeek-V4, and the newest versions the matrix checks.
MINIMUM = {"vllm": "0.20.0", "sglang": "0.5.12"}
NEWEST_TESTED = {"vllm": "0.33.0", "sglang": "0.5.23"}
ENGINE_TITLE = {"vllm": "vLLM", "sglang": "SGLang"}


def facts(engine: str) -> tuple[Fact, ...]:
    return tuple(f for f in FACTS if f.engine == engine)


def facts_for(engine: str, version: str | Version) -> frozenset[str]:
    """Ids of the facts that hold for this engine version."""
    return frozenset(f.id for f in facts(engine) if f.holds(version))


def is_supported(engine: str, version: str | Version) -> bool:
    return release(version) >= Version(MINIMUM[engine])


def is_newer_than_tested(engine: str, version: str | Version) -> bool:
    return release(version) > Version(NEWEST_TESTED[engine])
