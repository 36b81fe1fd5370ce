"""Routing policies are pure functions of snapshots: the same code in the simulator and the router."""

from __future__ import annotations

import random

import pytest

from emulator.router.backends import parse_load
from emulator.router.policies import (
    EndpointSnapshot,
    KVAware,
    LeastLoaded,
    NoEndpointError,
    PrefixAffinity,
    RoundRobin,
    RoutingRequest,
    SessionAffinity,
)
from emulator.sim.loadboard import SMALL_FLEET, LoadBoard

REQ = RoutingRequest("r")


def snaps(*loads, healthy=None, free=None):
    healthy = healthy or [True] * len(loads)
    free = free or [100] * len(loads)
    return [
        EndpointSnapshot(f"b{i}", num_running=n, healthy=h, free_blocks=f)
        for i, (n, h, f) in enumerate(zip(loads, healthy, free, strict=True))
    ]


def test_round_robin_rotates_over_healthy_backends():
    rr = RoundRobin()
    eps = snaps(0, 0, 0, healthy=[True, False, True])
    assert [rr.choose(eps, REQ) for _ in range(4)] == [0, 2, 0, 2]


def test_least_loaded_picks_the_emptiest_and_rotates_ties():
    ll = LeastLoaded()
    assert ll.choose(snaps(5, 1, 3), REQ) == 1
    picks = {ll.choose(snaps(2, 2, 9), REQ) for _ in range(4)}
    assert picks == {0, 1}


class _Queues:
    """What the load board reads of a simulated instance: its scheduler and its queue lengths."""

    def __init__(self) -> None:
        self.scheduler = type("S", (), {"changes": None})()
        self.running = self.waiting = 0

    def queue_lengths(self) -> tuple[int, int]:
        return self.running, self.waiting


@pytest.mark.parametrize("size", [1, 3, SMALL_FLEET, SMALL_FLEET + 1, 100])
def test_load_board_chooses_as_least_loaded_over_fresh_snapshots(size):
    """The simulator's board (Python lists up to SMALL_FLEET instances, numpy above) must pick what
    the router's policy picks, ties and their rotation included, and answer the admission check."""
    rng = random.Random(size)
    fleet = [_Queues() for _ in range(size)]
    board, policy = LoadBoard(fleet), LeastLoaded()
    for _ in range(300):
        for inst in rng.sample(fleet, k=min(size, 3)):  # a few instances change between decisions
            inst.running, inst.waiting = rng.randint(0, 3), rng.randint(0, 2)
            board.api_moved(inst)
        snapshots = [EndpointSnapshot(f"b{i}", q.running, q.waiting) for i, q in enumerate(fleet)]
        assert board.all_waiting_at_least(1) == all(q.waiting >= 1 for q in fleet)
        assert board.least_loaded(policy._turn) == policy.choose(snapshots, REQ)


def test_kv_aware_prefers_free_blocks_at_equal_load():
    assert KVAware().choose(snaps(1, 1, free=[10, 500]), REQ) == 1


def test_prefix_affinity_is_sticky_and_spills_under_load():
    pa = PrefixAffinity()
    req = RoutingRequest("r", block_hashes=(11, 22, 33, 44, 55))
    first = pa.choose(snaps(0, 0, 0, 0), req)
    assert all(pa.choose(snaps(0, 0, 0, 0), req) == first for _ in range(5))
    loads = [0, 0, 0, 0]
    loads[first] = 50
    assert pa.choose(snaps(*loads), req) != first  # bounded by load
    other = RoutingRequest("r", block_hashes=(99, 98, 97, 96))
    assert len({pa.choose(snaps(0, 0, 0, 0), RoutingRequest("x", block_hashes=(h,))) for h in range(40)}) > 1
    assert other.block_hashes != req.block_hashes


def test_session_affinity_follows_the_session_key():
    sa = SessionAffinity()
    a = RoutingRequest("1", session="alice")
    assert len({sa.choose(snaps(0, 0, 0), a) for _ in range(5)}) == 1


def test_no_healthy_backend_is_an_explicit_error():
    with pytest.raises(NoEndpointError):
        LeastLoaded().choose(snaps(0, healthy=[False]), REQ)


def test_router_reads_vllm_gauges_from_metrics_text():
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="4096"} 1.0\n'
    )
    assert parse_load(text) == {"running": 3.0, "waiting": 2.0, "kv_usage": 0.25, "num_gpu_blocks": 4096.0}
