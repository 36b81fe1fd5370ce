"""How many emulated instances this host can run faithfully.

N decode-heavy aggregated instances (Llama-3.1-8B on H100, 128-token prompts, 512-token
answers, one token per SSE chunk as vLLM streams) behind the router, each kept busy by
closed-loop streaming clients. For each N: streamed tokens/s at the clients and each
worker's step timing error p99 against 5% of its median step (the workers' own
``infemu_emulation_overloaded`` verdict). Reports the largest faithful N. With
``--dilation D`` every step lasts D times longer in wall time, so the 5% budget grows D-fold
while the streamed tokens/s (wall) shrink D-fold.

    python benchmarks/emulation_capacity.py [--sizes 1,2,4,8,16,32] [--seconds 15] [--clients-per-instance 8]
    python benchmarks/emulation_capacity.py --sizes 32 --per-process 16   # 32 instances on 2 worker processes
    python benchmarks/emulation_capacity.py --profile 8,256 --seconds 10   # CPU per token, and where it goes
    python benchmarks/emulation_capacity.py --sizes 32,64 --per-process 8 --find-dilation   # the D each size needs,
        # and the smallest D whose step-timing error p99 is within 1 emulated ms (issue 17's bound)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request

import yaml
from aiohttp import ClientSession, ClientTimeout, TCPConnector
from prometheus_client.parser import text_string_to_metric_families

from emulator.cluster.local import LocalCluster
from emulator.trust import MIN_TIMED_STEPS

MODEL = "llama-3.1-8b"
# issue 17's bound on the step-timing error p99, in emulated time (the workers' own verdict is stricter:
# 5% of a step, 0.35 ms for this model's ~7 ms decode steps)
BOUND_EMULATED_MS = 1.0


def spec_for(n: int, dilation: float, per_process: int = 1, stream_interval: int = 1) -> dict:
    return {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "InferenceCluster",
        "metadata": {"name": f"capacity-{n}"},
        "spec": {
            "model": MODEL,
            "engine": {"name": "vllm", "streamInterval": stream_interval},
            "gpu": "h100-sxm",
            "topology": {"nodes": (n + 7) // 8, "gpusPerNode": min(n, 8)},
            "pools": [{"name": "agg", "replicas": n, "maxModelLen": 4096}],
            "router": {"policy": "least_loaded"},
            "emulation": {"timeDilation": dilation, "instancesPerProcess": per_process},
        },
    }


async def closed_loop(url: str, clients: int, seconds: float) -> int:
    """Streaming clients that each send the next request when the last finishes; returns tokens."""
    body = json.dumps(
        {"model": MODEL, "prompt": list(range(1, 129)), "max_tokens": 512, "ignore_eos": True, "stream": True}
    ).encode()
    tokens = 0
    stop_at = time.monotonic() + seconds

    async def client(session: ClientSession) -> None:
        nonlocal tokens
        while time.monotonic() < stop_at:
            async with session.post(
                f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                async for block in resp.content.iter_any():
                    tokens += block.count(b'"text":"') - block.count(b'"text":"",')
                    if time.monotonic() >= stop_at:
                        break

    async with ClientSession(timeout=ClientTimeout(total=None), connector=TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return tokens


def worker_fidelity(url: str) -> tuple[float, float, bool, int]:
    """(timing error p99, median modelled step bucket, overloaded, steps timed) of one worker."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    p99, overloaded, steps, timed = 0.0, False, [], 0
    for fam in text_string_to_metric_families(text):
        if fam.name == "infemu_iteration_timing_error_p99_seconds":
            p99 = fam.samples[0].value
        elif fam.name == "infemu_emulation_overloaded":
            overloaded = fam.samples[0].value > 0
        elif fam.name == "infemu_iteration_modelled_seconds":
            steps = [(float(s.labels["le"]), s.value) for s in fam.samples if s.name.endswith("_bucket")]
        elif fam.name == "infemu_iteration_timing_error_seconds":
            timed = int(next((s.value for s in fam.samples if s.name.endswith("_count")), 0))
    total = steps[-1][1] if steps else 0
    median = next((le for le, c in steps if c >= total / 2), 0.0) if total else 0.0
    return p99, median, overloaded, timed


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def run_size(
    n: int, seconds: float, per_instance: int, dilation: float, per_process: int = 1, stream_interval: int = 1
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(spec_for(n, dilation, per_process, stream_interval), fh)
        lc = LocalCluster(path, f"capacity-{n}", run_dir=os.path.join(tmp, "run"))
        t0 = time.monotonic()
        state = lc.start()
        start_s = time.monotonic() - t0
        try:
            pids = {p.pid for p in state.processes if p.role != "router"}
            router_pid = next(p.pid for p in state.processes if p.role == "router")
            before = {pid: cpu_seconds(pid) for pid in (*pids, router_pid)}
            tokens = asyncio.run(closed_loop(state.router, n * per_instance, seconds))
            cpu = {pid: cpu_seconds(pid) - before[pid] for pid in before}
            fidelity = [worker_fidelity(p.url) for p in state.processes if p.role != "router"]
            memory = sum(rss_mb(pid) for pid in pids)
        finally:
            lc.stop()
    worker_cpu = sum(cpu[pid] for pid in pids)
    worst = max(fidelity, key=lambda f: f[0] / max(f[1], 1e-9))
    measured = all(f[3] >= MIN_TIMED_STEPS for f in fidelity)
    return {
        "instances": n,
        "worker_processes": len(pids),
        "workers_rss_mb": memory,
        "dilation": dilation,
        "start_s": start_s,
        "tokens_per_s": tokens / seconds,
        # CPU the workers and the router spent on the load window: per token, what a host pays to stream
        "worker_cpu_s": worker_cpu,
        "router_cpu_s": cpu[router_pid],
        "tokens_per_worker_cpu_s": tokens / worker_cpu if worker_cpu else None,
        "worst_p99_ms": worst[0] * 1e3,
        "median_step_ms_bucket": worst[1] * 1e3,
        # a worker with too few steps has no verdict yet: that is not a faithful one
        "measured": measured,
        "faithful": measured and not any(f[2] for f in fidelity),
    }


# where a process's CPU goes, by the module or function that spends it (cProfile's own time per function)
CATEGORIES = (
    ("JSON encode/decode", ("json/", "orjson")),
    ("SSE framing and chunk building", ("serve/protocol.py", "serve/tokens.py")),
    ("aiohttp request/response and writes", ("aiohttp/", "multidict", "yarl")),
    ("socket and transport I/O", ("selector_events.py", "selectors.py", "socket", "uvloop")),
    ("scheduler step", ("emulator/engine/",)),
    ("engine loop and timers", ("serve/engine_loop.py", "asyncio/events.py", "base_events.py", "heapq")),
    ("metrics", ("prometheus_client",)),
    ("cost model (pricing each step)", ("emulator/costmodel/",)),
    ("timing statistics (numpy)", ("numpy",)),
    ("router", ("emulator/router/",)),
    ("request handler (serve/app.py)", ("serve/app.py",)),
    ("asyncio tasks, queues and futures", ("asyncio/", "<built-in method _asyncio")),
)


# cProfile counts wall time: the event loop's waits are idle, not work. asyncio's selector waits in
# epoll; emulator/event_loop.py's waits in select() on the epoll descriptor, then polls it at once
IDLE_WAITS = ("<method 'poll' of 'select.epoll' objects>", "<built-in method select.select>")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def breakdown(prof_path: str) -> dict[str, float]:
    """Share of the profiled time per category (cProfile tottime, so nothing is counted twice)."""
    import pstats

    stats = pstats.Stats(prof_path).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
    shares: dict[str, float] = {}
    total = 0.0
    for (file, _, func), (_, _, tottime, _, _) in stats.items():
        if func in IDLE_WAITS:
            continue  # waiting for the network or a timer is idle time, not work
        where = f"{file} {func}"
        name = next((c for c, keys in CATEGORIES if any(k in where for k in keys)), "other")
        shares[name] = shares.get(name, 0.0) + tottime
        total += tottime
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])} if total else {}


def profile_one(clients: int, seconds: float, stream_interval: int = 1) -> dict:
    """One instance behind the router, saturated by ``clients`` streams: CPU per streamed token for
    the worker and the router (a plain window), and where each one's CPU goes (a second window
    under cProfile, whose overhead inflates Python time: its shares, applied to the plain cost)."""
    from emulator.cluster.process import PROFILE_ENV

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(spec_for(1, 1.0, 1, stream_interval), fh)
        prof_dir = os.path.join(tmp, "prof")
        os.environ[PROFILE_ENV] = prof_dir
        lc = LocalCluster(path, "capacity-1", run_dir=os.path.join(tmp, "run"))
        try:
            state = lc.start()
        finally:
            del os.environ[PROFILE_ENV]
        try:
            pids = {("router" if p.role == "router" else "worker"): p.pid for p in state.processes}
            # first the real cost (no profiler), then the same load profiled for the shares
            before = {k: cpu_seconds(pid) for k, pid in pids.items()}
            tokens = asyncio.run(closed_loop(state.router, clients, seconds))
            cpu = {k: cpu_seconds(pid) - before[k] for k, pid in pids.items()}
            for pid in pids.values():
                os.kill(pid, signal.SIGUSR1)  # profile the load, not the start-up
            asyncio.run(closed_loop(state.router, clients, seconds))
        finally:
            lc.stop()
        profiles = {
            "worker": breakdown(os.path.join(prof_dir, "agg-0.prof")),
            "router": breakdown(os.path.join(prof_dir, "router.prof")),
        }
    return {
        "streams": clients,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "cpu_s": cpu,
        "tokens_per_cpu_s": {k: tokens / v if v else None for k, v in cpu.items()},
        "us_per_token": {k: 1e6 * v / tokens if tokens else None for k, v in cpu.items()},
        "breakdown": profiles,
        "stream_interval": stream_interval,
        # the same streams at the same step cadence with nothing but a timer and one write per stream
        "floor_us_per_token": 1e6 * io_floor(clients, clients / (tokens / seconds), seconds, stream_interval)
        if tokens
        else None,
    }


# The readers of io_floor's streams: a separate process, so that only the writing side is measured.
FLOOR_READER = """
import asyncio, sys
async def main(port, n):
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    async def drain(reader):
        while await reader.read(65536):
            pass
    await asyncio.gather(*(drain(r) for r, _ in conns))
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def io_floor(streams: int, step_s: float, seconds: float, stream_interval: int = 1) -> float:
    """CPU seconds per token of the least a streaming server can do at this cadence: on the worker's
    event loop, a timer at every step's deadline, then one pre-built SSE token chunk written to each
    of ``streams`` sockets — no HTTP parsing, no engine, no JSON. What the worker pays above this is
    the emulation's own; this much the host charges any asyncio server that streams one token per
    stream per step (waking from a sleep of a step's length costs more than the same code run hot).
    With ``stream_interval`` N, every N-th step writes N chunks at once, as the worker then does."""
    from emulator import event_loop

    choice = {"index": 0, "text": " token", "logprobs": None, "finish_reason": None}
    event = {"id": "cmpl-0123456789abcdef", "object": "text_completion", "model": MODEL, "choices": [choice]}
    data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    burst = data * stream_interval
    burst = b"%x\r\n%b\r\n" % (len(burst), burst)  # HTTP/1.1 chunked, as aiohttp frames a stream

    async def serve() -> float:
        loop = asyncio.get_running_loop()
        transports: list[asyncio.Transport] = []
        connected = asyncio.Event()

        class Sink(asyncio.Protocol):
            def connection_made(self, transport):  # type: ignore[override]
                transports.append(transport)
                if len(transports) == streams:
                    connected.set()

        server = await loop.create_server(Sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOR_READER, str(port), str(streams))
        try:
            await asyncio.wait_for(connected.wait(), 30)
            deadline = loop.time()
            end = deadline + seconds
            cpu0, steps = time.process_time(), 0
            while deadline < end:
                deadline += step_s
                wake = loop.create_future()
                loop.call_at(deadline, wake.set_result, None)
                await wake
                steps += 1
                if steps % stream_interval == 0:
                    for transport in transports:
                        transport.write(burst)
            return (time.process_time() - cpu0) / (steps * streams)
        finally:
            for transport in transports:
                transport.close()
            server.close()
            reader.kill()
            await reader.wait()

    return event_loop.run(serve())


def print_profile(row: dict) -> None:
    print(
        f"{row['streams']} streams on one instance: {row['tokens_per_s']:,.0f} tok/s streamed; "
        + ", ".join(
            f"{k} {row['us_per_token'][k]:.1f} µs CPU/token ({row['tokens_per_cpu_s'][k]:,.0f} tok per CPU-s)"
            for k in ("worker", "router")
        )
        + "; shares from a second, profiled window"
    )
    floor = row["floor_us_per_token"]
    if floor:
        every = "step" if row["stream_interval"] == 1 else f"{row['stream_interval']} steps"
        print(
            f"  floor: a bare asyncio timer + one write per stream per {every} at the same cadence costs "
            f"{floor:.1f} µs CPU/token ({1e6 / floor:,.0f} tok per CPU-s); "
            f"the worker spends {row['us_per_token']['worker'] / floor:.1f}x that"
        )
    for who in ("worker", "router"):
        per_token = row["us_per_token"][who]
        parts = [
            f"{name} {100 * share:.0f}% ({share * per_token:.1f} µs)" for name, share in row["breakdown"][who].items()
        ]
        print(f"  {who}: " + "; ".join(parts))


def print_row(row: dict) -> None:
    verdict = "faithful" if row["faithful"] else ("OVERLOADED" if row["measured"] else "too few steps timed")
    print(
        f"D={row['dilation']:g} N={row['instances']:3d} on {row['worker_processes']} processes "
        f"({row['workers_rss_mb']:.0f} MB) start {row['start_s']:5.1f}s  "
        f"streamed {row['tokens_per_s']:8.0f} tok/s ({row['tokens_per_worker_cpu_s'] or 0:,.0f} per worker CPU-s)  "
        f"worst timing p99 {row['worst_p99_ms']:6.2f} ms "
        f"= {row['worst_p99_ms'] / row['dilation']:.2f} emulated ms "
        f"(median step <= {row['median_step_ms_bucket']:.0f} ms)  {verdict}",
        flush=True,
    )


def find_dilations(sizes: list[int], args: argparse.Namespace) -> None:
    """For each size, the smallest time dilation (doubling from --dilation, up to 64) at which no worker is
    overloaded: what `infemu run --time-dilation auto` would settle on for this load, searched exhaustively."""
    found = []
    for n in sizes:
        dilation, within = args.dilation, None
        while True:
            # a step lasts ~7 ms x D: long enough for every worker to time the steps its verdict needs
            seconds = max(args.seconds, 0.6 * dilation)
            row = run_size(n, seconds, args.clients_per_instance, dilation, args.per_process, args.stream_interval)
            if not args.json:
                print_row(row)
            if within is None and row["measured"] and row["worst_p99_ms"] / dilation <= BOUND_EMULATED_MS:
                within = dilation
            if row["faithful"] or dilation >= 64:
                break
            dilation *= 2
        found.append({**row, "within_bound_from": within})
    if args.json:
        print(json.dumps(found))
        return
    for row in found:
        within = row["within_bound_from"]
        print(
            f"{row['instances']} instances: "
            + (f"faithful from D={row['dilation']:g}" if row["faithful"] else "not faithful at D=64")
            + f" (worst step-timing error p99 {row['worst_p99_ms'] / row['dilation']:.2f} emulated ms); "
            + (
                f"p99 within {BOUND_EMULATED_MS:g} emulated ms from D={within:g}"
                if within is not None
                else f"p99 over {BOUND_EMULATED_MS:g} emulated ms at every D tried"
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4,8,16,32")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--clients-per-instance", type=int, default=8)
    ap.add_argument("--dilation", type=float, default=1.0, help="time dilation D (steps last D times longer)")
    ap.add_argument("--per-process", type=int, default=1, help="instances per worker process (instancesPerProcess)")
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="spec.engine.streamInterval: the workers send a stream's tokens every N tokens (first at once)",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--find-dilation",
        action="store_true",
        help="for each size, double the dilation from --dilation until no worker is overloaded, and report it",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="comma-separated stream counts: profile one saturated instance and the router at each "
        "(CPU per streamed token and where it goes) instead of the size sweep",
    )
    args = ap.parse_args()
    if args.profile:
        rows = [profile_one(int(c), args.seconds, args.stream_interval) for c in args.profile.split(",")]
        if args.json:
            print(json.dumps(rows))
        else:
            for row in rows:
                print_profile(row)
        return
    if args.find_dilation:
        find_dilations([int(x) for x in args.sizes.split(",")], args)
        return
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        row = run_size(
            n, args.seconds, args.clients_per_instance, args.dilation, args.per_process, args.stream_interval
        )
        rows.append(row)
        if not args.json:
            print_row(row)
        if len(rows) >= 2 and not rows[-1]["faithful"] and not rows[-2]["faithful"]:
            break  # two overloaded sizes in a row: larger ones will not do better
    if args.json:
        print(json.dumps(rows))
        return
    ok = [r for r in rows if r["faithful"]]
    if ok:
        best = max(ok, key=lambda r: r["instances"])
        print(
            f"largest faithful cluster on this host: {best['instances']} instances, "
            f"{best['tokens_per_s']:.0f} streamed tokens/s (targets: >= 32 instances, >= 10,000 tok/s)"
        )
    else:
        print("no size ran faithfully on this host", file=sys.stderr)


if __name__ == "__main__":
    main()
