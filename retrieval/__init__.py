"""Retrieval layer: embedding jobs, FAISS indexes and the search service.

Uses only ``mmpretrain.api`` (and ``mmpretrain.types``), never mmpretrain's internals.
The indexes and service arrive with the retrieval issue; this package holds the boundary.
"""
