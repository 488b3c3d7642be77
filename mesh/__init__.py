"""zeromesh: a brokerless messaging mesh for Python on ZeroMQ.

The core package. ``patterns`` builds on the public API exported here; this package never
imports ``patterns``.
"""

from mesh._version import __version__

__all__ = ["__version__"]
