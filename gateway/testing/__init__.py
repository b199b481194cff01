"""Test helpers that start real processes (a standalone Triton server) on loopback ports."""
