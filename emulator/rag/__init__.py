"""Retrieval for RAG pipelines: the synthetic corpus and its search results (the ``rag`` role's data)."""
