"""infemu's Kubernetes operator (import name ``infemu_operator``: a top-level ``operator`` would
shadow the standard library). This package currently holds the CRD generator; the kopf handlers,
the pure reconcile and the chart follow (issue "Kubernetes")."""
