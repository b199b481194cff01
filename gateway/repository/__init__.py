"""Where models come from: the Triton-style repository layout and everything that fills one.

- ``local``: ``<root>/<model>/[config.pbtxt]``, ``<version>/model.onnx``, version policy.
- ``config``: ``ModelConfig``, the subset of Triton's model configuration the gateway reads.
- ``manifest``: the published format an origin serves (``models.json``, ``manifest.json``).
- ``origin``: fetching from ``file://``, ``http(s)://`` and ``s3://`` origins.
- ``cache``: the verified, content-addressed local blob cache.
- ``edge``: ``EdgeRepository``, a local repository whose files come from an origin, pulled on
  first use.

It reads and stores files; it never executes a model.
"""
