"""gateway: an Open Inference Protocol (KServe v2) front door for ONNX Runtime and Triton hosts."""

__version__ = "0.1.0"
