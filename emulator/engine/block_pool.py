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
        # Blocks come to life on first use: ids below ``len(ref_cnt)`` have been allocated at least
        # once, the rest are fresh. Fresh blocks sit at the LRU end of vLLM's free queue (it starts
        # as 0..N-1 and freed blocks join its other end), so allocating them first, in id order,
        # is the same order; memory grows with the blocks a run touches, not with the GPU's
        # capacity (a thousand-instance simulation would otherwise hold every block of every GPU).
        self.ref_cnt: list[int] = []
        self.block_hash: list[int | None] = []
        self.free_queue: OrderedDict[int, None] = OrderedDict()  # used blocks with no reference, LRU first
        self.cached: dict[int, int] = {}  # hash -> block id
        self.version = 0  # bumped by every allocation, revival and free (the free count changes)
        self.evictions = 0
        # hashes of cached blocks evicted since the driver last drained them (a KV store's on-evict
        # writes); None: not recorded
        self.evicted: list[int] | None = None

    @property
    def num_free(self) -> int:
        return self.num_blocks - len(self.ref_cnt) + len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take n blocks from the LRU end of the free queue (fresh blocks first), evicting their
        cached hashes."""
        self.version += 1
        free = self.num_free
        if n > free:
            raise RuntimeError(f"cannot allocate {n} blocks, {free} free")
        fresh = min(n, self.num_blocks - len(self.ref_cnt))
        out = list(range(len(self.ref_cnt), len(self.ref_cnt) + fresh))
        self.ref_cnt.extend([1] * fresh)
        self.block_hash.extend([None] * fresh)
        pop = self.free_queue.popitem
        for _ in range(n - fresh):
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
        self.version += 1
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
        todo = [h for h in hashes if h not in self.cached][: self.num_free]
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
        self.version += 1
        for b in blocks:
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_queue[b] = None
            elif self.ref_cnt[b] < 0:
                raise RuntimeError(f"block {b} freed twice")
