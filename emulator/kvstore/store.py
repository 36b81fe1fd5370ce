"""A KV-cache store keyed by chained prefix block hashes, bounded in bytes, evicting least recently used.

As Mooncake Store and LMCache key KV chunks by the hash of the prefix that produced them, a block
here is named by the same chained hash the engines' prefix caches use (``engine/hashing.py``), so a
lookup is "how many leading blocks of this prompt does the store hold". Every block of a model has
the same size (its KV bytes per token x the block size), so capacity is a block count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StoreStats:
    lookups: int = 0
    lookup_blocks: int = 0  # blocks asked about
    hit_blocks: int = 0  # leading blocks found
    put_blocks: int = 0  # new blocks written
    evicted_blocks: int = 0
    fetched_blocks: int = 0  # blocks read out (a fetch)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class KVStore:
    def __init__(self, capacity_bytes: float, block_bytes: float) -> None:
        if block_bytes <= 0:
            raise ValueError("a KV block has a positive size")
        self.block_bytes = block_bytes
        self.capacity_blocks = int(capacity_bytes // block_bytes)
        if self.capacity_blocks < 1:
            raise ValueError(
                f"kvstore.capacityGb: {capacity_bytes / 1e9:g} GB holds no {block_bytes / 1e6:.2f} MB KV block; "
                "raise the capacity"
            )
        self._blocks: OrderedDict[int, None] = OrderedDict()  # hash -> None, LRU first
        self.stats = StoreStats()

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def used_bytes(self) -> float:
        return len(self._blocks) * self.block_bytes

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def lookup(self, hashes: Sequence[int], start: int = 0) -> int:
        """How many blocks from ``start`` on are held, contiguously (a prefix can only be used whole).
        Found blocks become the most recently used."""
        self.stats.lookups += 1
        self.stats.lookup_blocks += max(len(hashes) - start, 0)
        n = 0
        for h in hashes[start:]:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            n += 1
        self.stats.hit_blocks += n
        return n

    def fetched(self, blocks: int) -> None:
        self.stats.fetched_blocks += blocks

    def read(self, hashes: Sequence[int]) -> int:
        """A fetch: the leading blocks still held (an eviction since the lookup may cut it short),
        made most recently used and counted as fetched."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            n += 1
        self.fetched(n)
        return n

    def put(self, hashes: Sequence[int]) -> int:
        """Store blocks (refreshing ones already held); evict the least recently used beyond capacity.
        Returns how many were new (the bytes a writer actually sends)."""
        new = 0
        for h in hashes:
            if h in self._blocks:
                self._blocks.move_to_end(h)
                continue
            self._blocks[h] = None
            new += 1
        self.stats.put_blocks += new
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
            self.stats.evicted_blocks += 1
        return new

    def missing(self, hashes: Sequence[int]) -> list[int]:
        """The blocks of ``hashes`` the store does not hold (what a write must send)."""
        return [h for h in hashes if h not in self._blocks]
