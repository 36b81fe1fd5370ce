"""``infemu plan``: which parallelism, disaggregation and placement give the most goodput per GPU
under an SLO (DistServe's question), found in the simulator and confirmed in the emulation.

``candidates`` enumerates designs (aggregated; prefill/decode with their own TP/PP and a P:D
ratio) and their placements, and prunes with cheap bounds (memory fit, what an idle instance
can meet, per-GPU capacity from the cost model); ``search`` finds each survivor's highest rate
that meets the attainment target (bisection, common random numbers, a process pool); ``output``
ranks them, writes the best specs and confirms the top ones as local emulations.
"""
