"""The engine: scheduler, KV cache, block pool and requests, one vLLM-v1-like model shared by the
simulator and the emulated workers. Its per-sequence core may run compiled (emulator/native.py)."""

from emulator.native import attach

attach(__name__, __path__)
