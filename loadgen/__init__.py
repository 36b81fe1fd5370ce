"""infemu's load generator: Locust users that stream from an OpenAI endpoint and measure every
request from the stream (TTFT, each inter-token gap, TPOT, E2E), plus the pure workload builders."""
