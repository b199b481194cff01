"""Tooling for tests and benches, never imported by the gateway itself: a standalone Triton
server (``tritonserver``, the build bundled in ``nvidia-pytriton``) started and stopped on
loopback ports."""
