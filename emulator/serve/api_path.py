"""The modelled API server of one worker, in wall-clock time: the same serial event loop the
simulator models (``emulator.costmodel.engines.ApiCosts``), minus what the emulation's own HTTP
path already costs.

A request is handed to the engine when the modelled loop has taken it in (FIFO with every
other request and every step's streaming work); a step's tokens are released to their streams
when the loop has streamed them. Both delays are modelled durations x the time dilation.

The emulation's real path (client -> router -> worker -> router -> client) is not free, and
it must not be paid twice. Both ways are taken out:

- The way in: the router stamps every request with when it reached the cluster (its receipt,
  or the planned send time that `infemu run`'s own client stamps: ``serve.app.stamped_arrival``),
  and the worker counts from that stamp, not from its own receipt.
- The way back (worker -> router -> client, and the worker's own lateness in writing a released
  token): the worker lets the engine see a request that much earlier than the modelled API
  server would hand it over (never before it reached the cluster), so its tokens reach the
  client when the model says. The launcher measures an idle round trip with probe requests at
  start (``infemu up`` / ``infemu run``); during `infemu run` the client measures the real way
  back of every first token under the run's load (each worker reports when the model released
  it: ``FIRST_DUE_HEADER``) and its running median replaces the idle figure
  (``emulator.client.ClusterLink``). The router passes the current figure on with every request.

That is how the emulated TTFT equals the model's at time dilation 1, as long as the modelled
API path is longer than the real way back.
"""

from __future__ import annotations

from emulator.costmodel.engines import ApiCosts


class ApiServerPath:
    def __init__(self, api: ApiCosts, dilation: float = 1.0) -> None:
        self.api = api
        self.dilation = dilation
        self.free_at = 0.0  # wall time the modelled event loop is next idle
        self.path_overhead_s = 0.0  # measured: what the emulation's own way back to the client costs

    def admit(self, received: float, prompt_tokens: int) -> float:
        """When the engine may see a request the front door received at ``received``."""
        start = max(received, self.free_at)
        self.free_at = start + self.api.request_s(prompt_tokens) * self.dilation
        return max(received, self.free_at + self.api.latency_s * self.dilation - self.path_overhead_s)

    def release(self, step_end: float, outputs: int) -> float:
        """When the tokens of a step that ended at ``step_end`` go out to their streams."""
        start = max(step_end, self.free_at)
        self.free_at = start + self.api.step_s(outputs) * self.dilation
        return self.free_at

    def observe_path_overhead(self, seconds: float) -> None:
        if 0.0 <= seconds < 1.0:  # a stale or absurd report is ignored
            self.path_overhead_s = seconds
