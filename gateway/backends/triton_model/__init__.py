"""The Triton python-backend model the gateway pushes to hosts without an onnxruntime backend.

``model.py`` is a file shipped with this package, not a module the gateway imports: it is read
as bytes (``importlib.resources``, by ``gateway.backends.triton_python_model``) and pushed next
to each version's ``model.onnx``; Triton's python-backend stub loads it by path on the host.
It therefore imports nothing from ``gateway`` (which the host does not have), only ``numpy``,
``onnxruntime`` and ``triton_python_backend_utils`` (which exists only inside Triton).
"""
