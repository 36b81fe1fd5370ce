"""The cluster-internal hop: who may make a worker move KV.

``kv_transfer_params`` make a decode worker connect to the peer they name and pull its KV, and
``/internal/kv/<id>`` hands a held KV cache to whoever asks. Neither may be driven by a client.
Every process of one cluster gets the same random token at start (``INFEMU_INTERNAL_TOKEN``:
the local launcher makes one per run, the operator keeps one per InferenceCluster in a Secret)
and sends it in ``X-Infemu-Internal`` on router -> worker and worker -> worker requests; a worker
honours transfer parameters and serves KV only to requests that carry it. The router also drops
any ``kv_transfer_params`` a client sends, so through the front door they never arrive at all.
"""

from __future__ import annotations

import hmac
import os
import secrets

INTERNAL_TOKEN_HEADER = "X-Infemu-Internal"
TOKEN_ENV = "INFEMU_INTERNAL_TOKEN"


def cluster_token() -> str | None:
    """This process's cluster token; None where none was given (a worker started by hand)."""
    return os.environ.get(TOKEN_ENV) or None


def new_token() -> str:
    return secrets.token_hex(16)


def is_internal(headers, token: str | None) -> bool:
    """Whether a request comes from inside the cluster. Without a token every caller is trusted,
    as before: the launcher and the operator always set one."""
    if token is None:
        return True
    return hmac.compare_digest(headers.get(INTERNAL_TOKEN_HEADER, ""), token)


def internal_headers(token: str | None) -> dict[str, str]:
    return {INTERNAL_TOKEN_HEADER: token} if token else {}
