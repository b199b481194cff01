"""What executes a model version's batches, behind one protocol (:mod:`gateway.backends.base`).

- ``base``: the ``Backend`` and ``BackendFactory`` protocols the data plane sees, and the
  ``Host`` protocol for places other than this process.
- ``onnxruntime``: ONNX Runtime in this process (the only onnxruntime importer).
- ``triton`` (``TritonHost``), ``remote`` (``V2Host``): hosts, over their own protocols;
  ``hosts`` builds one from a checked spec; ``triton_python_model`` and ``triton_model/`` move an
  ONNX model to a Triton without an onnxruntime backend.
- ``routed`` (``RoutedBackend``): the execute path through the router, for every deployment
  with ``[[hosts]]``; ``placement`` (``RoutedFactory``): its loading, admin and host table.

How the router decides is ``gateway.routing``'s.
"""
