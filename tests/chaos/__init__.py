"""Chaos suite: a small mesh of real processes under a seeded fault schedule.

``python -m tests.chaos.run --seed N --duration S [--long]``; see docs/architecture.md.
"""
