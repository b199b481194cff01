"""Open Inference Protocol (KServe v2) as pure functions: the value types (``types``), the
rules every codec applies to a tensor, BYTES framing included (``tensors``), the server's JSON +
binary-tensor codec (``codec``), and the client codec for other v2 hosts (``client``). No I/O
here: the front ends and backends do that."""

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
