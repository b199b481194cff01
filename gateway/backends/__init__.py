"""Execution backends behind one protocol (see :mod:`gateway.backends.base`)."""
