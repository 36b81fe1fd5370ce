"""Run the operator: ``infemu operator [--namespace NS ...]`` out of cluster against the current
kubeconfig, or ``python -m infemu_operator`` as the image's operator entry point (same code).

Standalone (no kopf peering): the chart runs one replica with the ``Recreate`` strategy, so two
operators never handle the same resource, and no peering CRD has to be installed.
"""

from __future__ import annotations

import sys

import kopf


def run_operator(namespaces: list[str] | None = None, liveness: str | None = None, verbose: bool = False) -> int:
    from infemu_operator.handlers import register

    kopf.configure(verbose=verbose)
    settings = kopf.OperatorSettings()
    # with exact namespaces (a namespaced Role), do not list namespaces or CRDs cluster-wide
    settings.scanning.disabled = bool(namespaces)
    kopf.run(
        registry=register(kopf.get_default_registry(), tuple(namespaces or ())),
        settings=settings,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from emulator.cli import main as cli_main

    return cli_main(["operator", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
