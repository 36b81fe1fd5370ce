"""Paged KV blocks: ref counts, the LRU free queue and the hash → cached block map.

Mirrors vLLM's ``BlockPool``: a freed block keeps its hash and stays findable
until it is reused, so a later prefix hit can revive it. The free queue keeps
vLLM's ``FreeKVCacheBlockQueue`` order: allocation pops the least recently freed
block, a prefix hit removes a block from the middle in O(1). It is an int array,
4 bytes a block: a thousand simulated GPUs touch every block of their caches
over a long run, and an ``OrderedDict`` entry (164 bytes a block) made that 5 GB.
"""

from __future__ import annotations

from array import array

COMPACT_AFTER = 4096  # entries behind the head (or stale ones) before the free queue's array is compacted


class FreeBlockQueue:
    """LRU order of unreferenced blocks: ``append`` at the most recent end, ``popleft`` the least.

    A FIFO of block ids in an int array read from a head index: a finished request's blocks join in
    one run and an allocation takes a run, which array slices move at C speed (the doubly linked list
    this replaced walked every block in Python: a simulated request frees and takes ~80 blocks). A
    block taken from the middle (a prefix hit revives it) leaves its entry behind as stale; stale
    entries are skipped when the head reaches them. A block's stale entries always precede its live
    one (it was removed before it was freed again), so a count per block tells them apart.
    """

    __slots__ = ("_head", "_items", "_num_stale", "_size", "_stale", "compact_after")

    def __init__(self, compact_after: int = COMPACT_AFTER) -> None:
        # an argument, not a subclass's constant: the compiled engine core (emulator/native.py) takes no
        # Python subclasses, and a test compacts at every chance
        self.compact_after = compact_after
        self._items = array("i")
        self._head = 0
        self._size = 0  # live entries
        self._stale: dict[int, int] = {}  # block -> its stale entries still in the array
        self._num_stale = 0

    def __len__(self) -> int:
        return self._size

    def append(self, b: int) -> None:
        self._items.append(b)
        self._size += 1

    def extend(self, blocks: list[int]) -> None:
        """``append`` each block in turn (a finished request frees all its blocks)."""
        self._items.extend(blocks)
        self._size += len(blocks)

    def popleft(self) -> int:
        return self.popleft_many(1)[0]

    def popleft_many(self, n: int) -> list[int]:
        """The ``n`` least recent blocks, in order."""
        if n > self._size:
            raise IndexError(f"the free queue holds {self._size} blocks, not {n}")
        if n <= 0:
            return []
        items, head = self._items, self._head
        if not self._num_stale:
            out = items[head : head + n].tolist()
            head += n
        else:
            out = []
            stale = self._stale
            while len(out) < n:
                b = items[head]
                head += 1
                c = stale.get(b)
                if c:
                    if c == 1:
                        del stale[b]
                    else:
                        stale[b] = c - 1
                    self._num_stale -= 1
                else:
                    out.append(b)
        self._size -= n
        if not self._size:  # whatever is left is stale
            del items[:]
            self._stale.clear()
            self._num_stale = head = 0
        elif head > self.compact_after and 2 * head > len(items):
            del items[:head]
            head = 0
        self._head = head
        return out

    def remove(self, b: int) -> None:
        """Take a live block out of the queue (its entry stays behind, stale)."""
        self._stale[b] = self._stale.get(b, 0) + 1
        self._num_stale += 1
        self._size -= 1
        if self._num_stale > self.compact_after and self._num_stale > self._size:
            self._items = array("i", list(self))  # more stale entries than live ones: drop them
            self._head = 0
            self._stale.clear()
            self._num_stale = 0

    def __iter__(self):
        stale = dict(self._stale)
        for b in self._items[self._head :]:
            c = stale.get(b)
            if c:
                stale[b] = c - 1
            else:
                yield b


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
        self.ref_cnt = array("i")
        self.block_hash: list[int | None] = []
        self.free_queue = FreeBlockQueue()  # used blocks with no reference, LRU first
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
        reused = self.free_queue.popleft_many(n - fresh)
        block_hash, ref = self.block_hash, self.ref_cnt
        if not self.cached:  # no block carries a hash (block_hash[b] is set only with cached[h] = b)
            for b in reused:
                ref[b] = 1
            out.extend(reused)
            return out
        for b in reused:
            h = block_hash[b]
            if h is not None:
                if self.cached.get(h) == b:
                    del self.cached[h]
                    if self.evicted is not None:
                        self.evicted.append(h)
                block_hash[b] = None
                self.evictions += 1
            ref[b] = 1
        out.extend(reused)
        return out

    def lookup(self, h: int) -> int | None:
        return self.cached.get(h) if self.enable_caching else None

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks found by a prefix hit (reviving free ones)."""
        self.version += 1
        for b in blocks:
            if self.ref_cnt[b] == 0:
                self.free_queue.remove(b)
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
        ref = self.ref_cnt
        unreferenced = []
        for b in blocks:
            c = ref[b] - 1
            ref[b] = c
            if c == 0:
                unreferenced.append(b)
            elif c < 0:
                raise RuntimeError(f"block {b} freed twice")
        self.free_queue.extend(unreferenced)
