"""Open Inference Protocol (KServe v2): types and the JSON + binary-tensor codec."""

from gateway.protocol.codec import decode_infer_request, encode_infer_response
from gateway.protocol.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    datatype_of,
    numpy_dtype,
)

__all__ = [
    "DATATYPES",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "datatype_of",
    "decode_infer_request",
    "encode_infer_response",
    "numpy_dtype",
]
