"""Chaos experiments: declared fault schedules (``spec.faults``), resolved once into concrete actions
that the simulator, the local cluster and the operator each carry out, and the accounting per window."""
