"""Reliable pub/sub: durable streams, gap recovery, replay, durable subscriptions."""
