"""Attention backends behind one small interface, registered by name and imported lazily."""

from stepserve.attention.base import AttentionBackend, AttentionMetadata, get_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]
