"""Messaging patterns built on ``mesh``'s public API: pub/sub, pipeline, request/reply."""

__all__: list[str] = []
