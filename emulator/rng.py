"""Partitioned randomness: each subsystem draws from its own stream derived from the seed,
so a new draw in the router never shifts the workload (BLIS's PartitionedRNG)."""

from __future__ import annotations

import hashlib

import numpy as np


class PartitionedRNG:
    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def for_subsystem(self, name: str) -> np.random.Generator:
        digest = hashlib.sha256(name.encode("utf-8")).digest()
        key = int.from_bytes(digest[:8], "little")
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, key])))
