"""Runnable examples: ``python -m examples.NAME`` from the repository root (or after
``pip install -e .``). Each one prints what its docstring promises; the test suite runs them."""
