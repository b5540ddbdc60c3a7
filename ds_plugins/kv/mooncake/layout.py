"""Memory layouts per KV group and the block-level transfer plan between two of them.

A layout is, per KV cache group (DeepSeek-V4: compressed KV, sliding-window KV, indexer keys, each
under the hybrid KV cache manager), the list of regions of the group's layers. A request holds, per
group, a list of block ids; position i of that list covers the same tokens on both sides, so block i
of the sink's list is filled from block i of the source's list in every region of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .messages import Region


class PlanError(ValueError):
    """The two layouts or block lists cannot be matched; the message says where."""


@dataclass
class Plan:
    local: list[int] = field(default_factory=list)
    remote: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    # (group, block id) of sink blocks the source has no block for: they stay unfilled.
    unfilled: list[tuple[int, int]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(self.lengths)

    def _add(self, local: int, remote: int, length: int) -> None:
        # Extend the previous segment when both sides continue it: consecutive blocks of one region
        # become one transfer, which is what keeps per-request overhead low on TCP and RDMA alike.
        if self.lengths and self.local[-1] + self.lengths[-1] == local and self.remote[-1] + self.lengths[-1] == remote:
            self.lengths[-1] += length
        else:
            self.local.append(local)
            self.remote.append(remote)
            self.lengths.append(length)


def check_compatible(local: Sequence[Sequence[Region]], remote: Sequence[Sequence[Region]]) -> None:
    if len(local) != len(remote):
        raise PlanError(f"KV group count differs: local {len(local)}, remote {len(remote)}")
    for g, (lg, rg) in enumerate(zip(local, remote)):
        if len(lg) != len(rg):
            raise PlanError(f"group {g}: local has {len(lg)} cache regions, remote {len(rg)}")
        for r, (lr, rr) in enumerate(zip(lg, rg)):
            if lr.block_len != rr.block_len:
                raise PlanError(
                    f"group {g} region {r}: block_len differs (local {lr.block_len} B, "
                    f"remote {rr.block_len} B): the two instances use different KV layouts"
                )


def plan(
    local: Sequence[Sequence[Region]],
    remote: Sequence[Sequence[Region]],
    local_blocks: Sequence[Sequence[int]],
    remote_blocks: Sequence[Sequence[int]],
    null_block: int | None = None,
) -> Plan:
    """Addresses to read (sink side `local`, source side `remote`) to fill `local_blocks` from `remote_blocks`.

    `null_block` is the engine's placeholder id (vLLM: 0) for positions a group does not keep, such as
    tokens outside a sliding window: a null local block needs nothing; a null or missing remote block
    under a real local block cannot be filled and is reported in `unfilled`.
    """
    check_compatible(local, remote)
    if len(local_blocks) != len(local) or len(remote_blocks) != len(remote):
        raise PlanError(
            f"block lists for {len(local_blocks)} local / {len(remote_blocks)} remote groups, layouts have {len(local)}"
        )
    out = Plan()
    for g, (lg, rg, lb, rb) in enumerate(zip(local, remote, local_blocks, remote_blocks)):
        pairs = []
        for i, lid in enumerate(lb):
            if lid == null_block:
                continue
            rid = rb[i] if i < len(rb) else null_block
            if rid is None or rid == null_block:
                out.unfilled.append((g, lid))
                continue
            pairs.append((lid, rid))
        for r, (lr, rr) in enumerate(zip(lg, rg)):
            for lid, rid in pairs:
                if not (0 <= lid < lr.num_blocks):
                    raise PlanError(f"group {g} region {r}: local block {lid} outside [0, {lr.num_blocks})")
                if not (0 <= rid < rr.num_blocks):
                    raise PlanError(f"group {g} region {r}: remote block {rid} outside [0, {rr.num_blocks})")
                out._add(lr.base + lid * lr.stride, rr.base + rid * rr.stride, lr.block_len)
    return out


def spans(groups: Sequence[Sequence[Region]]) -> list[tuple[int, int]]:
    """The memory to register: every region's extent, overlapping and touching extents merged.

    Under the hybrid KV cache manager several layers (even of different groups) can share one tensor;
    registering it once per layer would hand the engine overlapping registrations.
    """
    extents = sorted(
        (r.base, r.base + (r.num_blocks - 1) * r.stride + r.block_len) for g in groups for r in g if r.num_blocks > 0
    )
    merged: list[list[int]] = []
    for start, end in extents:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e - s) for s, e in merged]
