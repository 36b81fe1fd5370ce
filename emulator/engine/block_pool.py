"""Paged KV blocks: ref counts, the LRU free queue and the hash → cached block map.

Mirrors vLLM's ``BlockPool``: a freed block keeps its hash and stays findable
until it is reused, so a later prefix hit can revive it. The free queue is an
``OrderedDict`` (a C-implemented doubly linked list): allocation pops the least
recently freed block, a prefix hit removes a block from the middle in O(1).
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("a KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.evictions = 0
        # hashes of cached blocks evicted since the driver last drained them (a KV store's on-evict
        # writes); None: not recorded
        self.evicted: list[int] | None = None

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take n blocks from the LRU end of the free queue, evicting their cached hashes."""
        if n > len(self.free_queue):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self.free_queue)} free")
        out = []
        pop = self.free_queue.popitem
        for _ in range(n):
            b, _ = pop(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self.cached.get(h) == b:
                    del self.cached[h]
                    if self.evicted is not None:
                        self.evicted.append(h)
                self.block_hash[b] = None
                self.evictions += 1
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def lookup(self, h: int) -> int | None:
        return self.cached.get(h) if self.enable_caching else None

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks found by a prefix hit (reviving free ones)."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self.free_queue[b]
            self.ref_cnt[b] += 1

    def cache_block(self, block: int, h: int) -> None:
        if not self.enable_caching or self.block_hash[block] is not None:
            return
        if h in self.cached:
            return  # an identical block is already cached; this copy stays unnamed
        self.block_hash[block] = h
        self.cached[h] = block

    def install(self, hashes: list[int]) -> int:
        """Blocks computed elsewhere (fetched from a KV store) become cached, unreferenced blocks, as if a
        finished request had left them: the next prefix lookup finds them. Takes free blocks from the LRU
        end; stops when none are left. The prefix's first block is freed last (evicted last)."""
        if not self.enable_caching:
            return 0
        todo = [h for h in hashes if h not in self.cached][: len(self.free_queue)]
        blocks = self.allocate(len(todo))
        for b, h in zip(blocks, todo, strict=False):
            self.cache_block(b, h)
        self.free(blocks[::-1])
        return len(todo)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference per block; blocks reaching zero join the free queue's MRU end.

        Callers pass blocks in reverse order so a request's tail is evicted before its
        (more shareable) prefix, as vLLM does.
        """
        for b in blocks:
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_queue[b] = None
            elif self.ref_cnt[b] < 0:
                raise RuntimeError(f"block {b} freed twice")
