"""``rag``: a retriever stage in front of generation (not available yet)."""

from emulator.roles import RoleInfo

ROLE = RoleInfo(
    name="rag",
    summary="retrieval for RAG requests",
    engine=False,
    front=False,
    unavailable="is not available in this version; remove the pool (the RAG workload sends synthetic documents)",
)
