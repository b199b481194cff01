"""HTTP front end: the only package that imports starlette.

- ``connections``: the uvicorn protocol subclass (per-connection timeouts, head cap, disconnect
  hook, gathered writes, inference answered without ASGI).
- ``infer``: ``HotPath``, inference requests from the socket to ``DataPlane.submit`` and back.
- ``app``: every other route (health, metadata, repository, statistics, admin, ``/metrics``).
- ``auth``: credentials and the admin-port split; ``errors``: the one error -> HTTP status table;
  ``distribution``: the repository tree and blobs edges pull; ``openapi``: the API document.

It translates HTTP and delegates: what a request does is the data plane's.
"""

from gateway.server.app import create_app

__all__ = ["create_app"]
