"""Calls to a running cluster's admin endpoints (``/admin/link``, ``/admin/fault``) with its token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from emulator.serve.internal import internal_headers


class AdminError(Exception):
    pass


def post_admin(url: str, path: str, body: dict, token: str | None, timeout_s: float = 5.0) -> dict:
    """POST one admin change; AdminError names the endpoint and what went wrong."""
    req = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **internal_headers(token or None)},
        method="POST",
    )
    return _call(req, url, path, timeout_s)


def get_admin(url: str, path: str, token: str | None, timeout_s: float = 2.0) -> dict:
    """GET an admin endpoint's view (a worker's or the router's fault state)."""
    return _call(urllib.request.Request(f"{url}{path}", headers=internal_headers(token or None)), url, path, timeout_s)


def _call(req: urllib.request.Request, url: str, path: str, timeout_s: float) -> dict:
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # the cluster's own loopback/bridge URLs
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AdminError(f"{url}{path} answered {exc.code}: {exc.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AdminError(f"{url}{path}: {exc}") from None
