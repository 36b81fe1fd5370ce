"""Collective time by message size for a group of GPUs, inside and across scale-up domains.

Inside one scale-up domain, a group of 2, 4 or 8 GPUs reads the measured NCCL (and vLLM
custom all-reduce) tables; other sizes, and GPUs without tables, use an alpha-beta model
whose bandwidth term is the ring's 2(n-1)/n of the message per link and whose latency term
is a switch round trip inside an NVSwitch domain (NVLS reduces in the switch: one hop there
and back whatever the group) and grows with log2 of the group over a scale-out fabric
(NCCL's trees); a ring's 2(n-1) hops would make a 64-GPU all-reduce 10x too slow.

A group wider than the domain (TP across nodes, EP over several nodes) runs hierarchically,
as NCCL does: a reduce-scatter and an all-gather inside each domain (priced as the
intra-domain all-reduce) plus an all-reduce of 1/d of the message among the n/d domains over
the scale-out tier, every GPU driving its own NIC.
"""

from __future__ import annotations

import math

import numpy as np

from emulator.catalog.links import LinkTier
from emulator.costmodel.grid import LogLine
from emulator.costmodel.tables import GpuTables

SIZES = np.geomspace(256, 2**33, 72)


def alpha_beta_all_reduce_s(tier: LinkTier, nbytes, n: int):
    if n <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=np.float64))
    b = np.asarray(nbytes, dtype=np.float64)
    hops = 2 if tier.kind == "scale-up" else 2 * math.ceil(math.log2(n))
    return hops * tier.latency_s + 2 * (n - 1) / n * b / tier.bandwidth


def alpha_beta_all_to_all_s(tier: LinkTier, nbytes, n: int):
    """Each GPU sends (n-1)/n of its ``nbytes`` to the others over its own port."""
    if n <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=np.float64))
    b = np.asarray(nbytes, dtype=np.float64)
    return math.ceil(math.log2(n)) * tier.latency_s + (n - 1) / n * b / tier.bandwidth


class Collectives:
    """Precomputed lines for the collectives of one instance's groups."""

    def __init__(
        self,
        tables: GpuTables | None,
        scale_up: LinkTier,
        scale_out: LinkTier,
        domain_size: int,
    ) -> None:
        self.tables = tables
        self.scale_up = scale_up
        self.scale_out = scale_out
        self.domain = max(1, domain_size)
        self.sources: dict[str, str] = {}

    def _intra(self, op: str, n: int) -> tuple[LogLine, str]:
        line = self.tables.collective_line(op, n) if self.tables is not None else None
        if line is not None:
            return line, "table"
        if op == "all_reduce":
            return LogLine(SIZES, alpha_beta_all_reduce_s(self.scale_up, SIZES, n)), "alpha-beta"
        return LogLine(SIZES, alpha_beta_all_to_all_s(self.scale_up, SIZES, n)), "alpha-beta"

    def all_reduce(self, n: int) -> tuple[LogLine | None, str]:
        """All-reduce of a message among ``n`` GPUs packed into domains of ``domain`` GPUs."""
        if n <= 1:
            return None, "none"
        inner = min(n, self.domain)
        line, src = self._intra("all_reduce", inner)
        domains = math.ceil(n / inner)
        if domains == 1:
            return line, src
        across = alpha_beta_all_reduce_s(self.scale_out, SIZES / inner, domains)
        return LogLine(SIZES, line(SIZES) + across), f"{src} + {self.scale_out.name} (hierarchical)"

    def all_to_all(self, n: int) -> tuple[LogLine | None, str]:
        """All-to-all (EP dispatch or combine) of ``bytes`` per GPU among ``n`` GPUs.

        Across domains, the share bound for other domains ((n - inner)/n of the data) crosses
        the scale-out tier; the rest moves inside the domain.
        """
        if n <= 1:
            return None, "none"
        inner = min(n, self.domain)
        if n <= inner:
            return self._intra("alltoall", n)
        local = alpha_beta_all_to_all_s(self.scale_up, SIZES * inner / n, inner)
        remote = self.scale_out.latency_s * math.ceil(math.log2(n / inner) + 1) + (n - inner) / n * SIZES / (
            self.scale_out.bandwidth
        )
        return LogLine(SIZES, np.maximum(local, remote)), f"alpha-beta {self.scale_up.name} + {self.scale_out.name}"
