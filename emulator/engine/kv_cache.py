"""The three verbs the scheduler needs from KV memory (vLLM's ``KVCacheManager``):
find computed prefix blocks, allocate slots (False = preempt someone), free."""

from __future__ import annotations

from collections.abc import Sequence

from emulator.engine.block_pool import BlockPool
from emulator.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks, enable_caching)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.req_blocks: dict[str, list[int]] = {}
        self._num_cached: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up (vLLM counts tokens)
        self.prefix_hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the prompt; at least one prompt token is always recomputed."""
        if not self.enable_caching or not req.block_hashes:
            return [], 0
        limit = min(len(req.block_hashes), (req.num_prompt_tokens - 1) // self.block_size)
        blocks = []
        for h in req.block_hashes[:limit]:
            b = self.pool.lookup(h)
            if b is None:
                break
            blocks.append(b)
        self.prefix_queries += req.num_prompt_tokens
        self.prefix_hits += len(blocks) * self.block_size
        return blocks, len(blocks) * self.block_size

    def cached_prefix_blocks(self, block_hashes: tuple[int, ...], num_prompt_tokens: int) -> int:
        """How many leading prompt blocks are cached here now (a look, not a hit: no stats, no refs)."""
        if not self.enable_caching:
            return 0
        limit = min(len(block_hashes), (num_prompt_tokens - 1) // self.block_size)
        n = 0
        while n < limit and self.pool.lookup(block_hashes[n]) is not None:
            n += 1
        return n

    def blocks_needed(self, req: Request, num_new_tokens: int, new_computed: Sequence[int] = ()) -> int:
        """Free blocks this allocation would consume (revived cached blocks count too)."""
        have = len(self.req_blocks.get(req.request_id, ())) + len(new_computed)
        total_tokens = req.num_computed_tokens + len(new_computed) * self.block_size + num_new_tokens
        need = -(-total_tokens // self.block_size) - have
        revive = sum(1 for b in new_computed if self.pool.ref_cnt[b] == 0)
        return max(need, 0) + revive

    def allocate_slots(self, req: Request, num_new_tokens: int, new_computed: Sequence[int] = ()) -> bool:
        if not new_computed:
            held = self.req_blocks.get(req.request_id)
            if held is not None and req.num_computed_tokens + num_new_tokens <= len(held) * self.block_size:
                return True  # the common decode case: the last block still has room
        if self.blocks_needed(req, num_new_tokens, new_computed) > self.pool.num_free:
            return False
        blocks = self.req_blocks.setdefault(req.request_id, [])
        if new_computed:
            self.pool.touch(list(new_computed))
            blocks.extend(new_computed)
            self._num_cached[req.request_id] = len(new_computed)
        total_tokens = req.num_computed_tokens + len(new_computed) * self.block_size + num_new_tokens
        need = -(-total_tokens // self.block_size) - len(blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        return True

    def grow_decodes(self, short: list[tuple[list[int], int]]) -> None:
        """New blocks for decoding requests, in one pool allocation: ``short`` holds, in the batch's
        order, each request's block list that needs more and how many (the caller computed them
        while advancing the batch: Scheduler.advance_steady). The same blocks, in the same order, as
        ``allocate_slots`` request by request; the caller has checked that they fit
        (Scheduler.steady_decode_horizon)."""
        fresh = self.pool.allocate(sum(need for _, need in short))
        i = 0
        for held, need in short:
            held.extend(fresh[i : i + need])
            i += need

    def cache_full_blocks(self, req: Request) -> None:
        """Name the prompt blocks that are now completely computed so later requests can hit them."""
        if not self.enable_caching or not req.block_hashes:
            return
        done = self._num_cached.get(req.request_id, 0)
        full = min(min(req.num_computed_tokens, req.num_prompt_tokens) // self.block_size, len(req.block_hashes))
        if full <= done:
            return
        blocks = self.req_blocks[req.request_id]
        for i in range(done, full):
            self.pool.cache_block(blocks[i], req.block_hashes[i])
        self._num_cached[req.request_id] = full

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, None)
        self._num_cached.pop(req.request_id, None)
        if blocks:
            self.pool.free(blocks[::-1])

    def num_blocks_of(self, req: Request) -> int:
        return len(self.req_blocks.get(req.request_id, ()))
