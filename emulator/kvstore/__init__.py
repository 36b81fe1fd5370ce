"""The remote KV-cache tier (the ``kvstore`` role): the store itself and the fetch-or-recompute choice."""
