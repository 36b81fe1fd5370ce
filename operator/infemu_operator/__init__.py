"""infemu's Kubernetes operator (import name ``infemu_operator``: a top-level ``operator`` would
shadow the standard library): CRDs generated from the spec models, a pure reconcile, thin kopf
handlers, the tc init container and the LoadTest Job."""
