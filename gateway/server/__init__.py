"""HTTP front end: the only package that imports starlette."""

from gateway.server.app import create_app

__all__ = ["create_app"]
