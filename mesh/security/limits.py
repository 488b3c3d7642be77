"""Per-peer ingress rate limits (kept in :mod:`mesh.limits`, which has no security
dependencies, so the node and ``mesh.observe`` use them without loading the security stack)."""

from __future__ import annotations

from mesh.limits import RateLimit, TokenBuckets

__all__ = ["RateLimit", "TokenBuckets"]
