"""One engine step as a real serving engine takes it: GPU kernels plus host-side work.

``EngineStepModel`` is the ``CostModel`` that the simulator and the emulated workers use.
It prices a batch in three explicit parts (``emulator.costmodel.engines`` holds the
per-engine constants and their sources):

1. CUDA graphs: a step whose tokens fit the largest captured size replays a graph; a
   decode-only batch is padded up to the next capture size, so its GEMMs and collectives
   run at the padded token count (attention only sees the real sequences). Larger steps
   (long prefill chunks) run eagerly: their kernels are launched one by one from the host,
   so the step takes at least the launch time of every layer's kernels.
2. Kernels: ``emulator.costmodel.instance``.
3. Host-side work of the step (schedule, prepare inputs, sample, process outputs): fixed +
   per sequence + per new prompt token. An engine that schedules asynchronously overlaps it
   with the GPU (the step takes the longer of the two); otherwise it adds to every step.
"""

from __future__ import annotations

import numpy as np

from emulator.costmodel.engines import EngineProfile
from emulator.costmodel.instance import InstanceCostModel
from emulator.costmodel.interface import BatchShape, StepTime

# Stretches up to this many steps are priced step by step in plain floats: below it that beats one
# vectorised call (the Azure replay's stretches are ~4 steps; timed with benchmarks/sim_speed.py).
SHORT_STRETCH = 8


class EngineStepModel:
    def __init__(self, kernels: InstanceCostModel, profile: EngineProfile) -> None:
        self.kernels = kernels
        self.profile = profile
        self.sources = dict(kernels.sources)
        self.sources["host"] = f"{profile.name} {profile.version} profile (emulator/costmodel/data/engines.yaml)"
        # an eager step takes at least its kernel launches (the profile and kernels never change)
        self.eager_floor_s = profile.host.eager_launch_s * kernels.eager_kernels()

    @property
    def cfg(self):
        return self.kernels.cfg

    # ---- the three parts ---------------------------------------------------------------
    def graph_tokens(self, shape: BatchShape) -> int | None:
        """Tokens the GEMMs run at when the step replays a CUDA graph, None when it runs eagerly.

        With attention DP each rank captures its own batch sizes; the group's padded count is
        the rank padding times the ranks.
        """
        dp = self.kernels.cfg.dp
        per_rank = -(-shape.num_tokens // dp)
        if shape.prefill_chunks:
            if not self.profile.cuda_graph_prefill:
                return None
            return shape.num_tokens if per_rank <= (self.profile.cuda_graph_sizes or (0,))[-1] else None
        size = self.profile.graph_size(per_rank)
        return None if size is None else max(size * dp, shape.num_tokens)

    def host_s(self, shape: BatchShape) -> float:
        h = self.profile.host
        prefill = sum(q for q, _ in shape.prefill_chunks)
        per_rank_seqs = -(-shape.num_seqs // self.kernels.cfg.dp)
        return h.step_fixed_s + h.per_seq_s * per_rank_seqs + h.per_prefill_token_s * prefill

    def _shaped(self, gpu, host: float, graphed: bool):
        """A GPU time as the host side shapes it (arrays over steps, or one step's plain float): an eager
        step takes at least its launches; the host's work overlaps it (async scheduling) or adds to it."""
        if not graphed:
            gpu = np.maximum(gpu, self.eager_floor_s)
        return np.maximum(gpu, host) if self.profile.host.async_overlap else gpu + host

    def _shaped_float(self, gpu: float, host: float, graphed: bool) -> float:
        """``_shaped`` of one step's plain float (np.maximum on two floats is max, at numpy's cost)."""
        if not graphed and self.eager_floor_s > gpu:
            gpu = self.eager_floor_s
        if self.profile.host.async_overlap:
            return host if host > gpu else gpu
        return gpu + host

    def _combine(self, gpu_total, gpu_interval, host: float, graphed: bool):
        """The step's total and interval as the host side shapes them."""
        return self._shaped(gpu_total, host, graphed), self._shaped(gpu_interval, host, graphed)

    # ---- CostModel ------------------------------------------------------------------------
    def step_time(self, shape: BatchShape) -> StepTime:
        if shape.num_tokens == 0:
            return StepTime(0.0, 0.0)
        padded = self.graph_tokens(shape)
        fast = self.kernels.step_seconds(shape, padded)  # plain floats: see InstanceCostModel.step_seconds
        if fast is not None:
            host, graphed = self.host_s(shape), padded is not None
            return StepTime(self._shaped_float(fast[0], host, graphed), self._shaped_float(fast[1], host, graphed))
        mean_kv = np.array([shape.decode_kv_sum / shape.num_decode]) if shape.num_decode else np.zeros(1)
        total, interval = self.kernels.totals(shape, mean_kv, padded)
        total, interval = self._combine(total, interval, self.host_s(shape), padded is not None)
        return StepTime(float(total[0]), float(interval[0]))

    def decode_stretch_s(self, num_decode: int, kv_sum_start: int, steps: int) -> np.ndarray:
        shape = BatchShape(num_decode=num_decode, decode_kv_sum=kv_sum_start)
        padded = self.graph_tokens(shape)
        if steps <= SHORT_STRETCH:
            short = self.kernels.decode_totals_short(num_decode, kv_sum_start, steps, padded)
            if short is not None:
                host, graphed = self.host_s(shape), padded is not None
                return np.array([self._shaped_float(g, host, graphed) for g in short])
        kv_sums = kv_sum_start + np.arange(steps, dtype=np.int64) * num_decode
        return self._shaped(
            self.kernels.decode_totals(num_decode, kv_sums / num_decode, padded), self.host_s(shape), padded is not None
        )

    def breakdown(self, shape: BatchShape) -> dict[str, float]:
        """Seconds per kernel, plus the host-side terms as the step sees them."""
        padded = self.graph_tokens(shape)
        ops = self.kernels.breakdown(shape, padded)
        if not shape.num_tokens:
            return ops
        gpu = sum(ops.values())
        host = self.host_s(shape)
        if padded is None and self.eager_floor_s > gpu:
            ops["host_eager_launch"] = self.eager_floor_s - gpu
            gpu = self.eager_floor_s
        ops["host_step"] = max(0.0, host - gpu) if self.profile.host.async_overlap else host
        return ops

    def kv_transfer_bytes(self, tokens: int) -> int:
        return self.kernels.kv_transfer_bytes(tokens)
