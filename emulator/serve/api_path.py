"""The modelled API server of one worker, in wall-clock time: the same serial event loop the
simulator models (``emulator.costmodel.engines.ApiCosts``), minus what the emulation's own HTTP
path already costs.

A request is handed to the engine when the modelled loop has taken it in (FIFO with every
other request and every step's streaming work); a step's tokens are released to their streams
when the loop has streamed them. Both delays are modelled durations x the time dilation.

The emulation's real path (client -> router -> worker -> router -> client) is not free, and
it must not be paid twice. The launcher measures it end to end with probe requests that the
workers answer at once (``infemu up`` / ``infemu run``), the router passes the measurement on
with every request, and the worker lets the engine see a request that much earlier than the
modelled API server would hand it over (never before the router received it): the request's
tokens then reach the client when the model says. That is how the emulated TTFT equals the
model's at time dilation 1, as long as the modelled API path is longer than the real one.
"""

from __future__ import annotations

from emulator.costmodel.engines import ApiCosts


class ApiServerPath:
    def __init__(self, api: ApiCosts, dilation: float = 1.0) -> None:
        self.api = api
        self.dilation = dilation
        self.free_at = 0.0  # wall time the modelled event loop is next idle
        self.path_overhead_s = 0.0  # measured: what the emulation's own HTTP round trip costs

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
