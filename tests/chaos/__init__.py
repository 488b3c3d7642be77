"""Chaos suite: a small mesh of real processes under a seeded fault schedule (issue 9).

``python -m tests.chaos.run --seed N --duration S [--long]``; see docs/architecture.md.
"""
