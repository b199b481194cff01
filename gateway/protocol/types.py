"""Protocol-level value types, independent of transport (REST or gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.errors import InvalidInput

# v2 datatype name -> numpy dtype. BYTES tensors are object arrays of ``bytes``.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
# dtype -> v2 name; a dict read where a call per tensor would count (hot paths)
DATATYPE_NAMES: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPES.items()}
_BY_DTYPE = DATATYPE_NAMES


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype for a v2 datatype name; unknown names are the client's error."""
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):
        raise InvalidInput(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """The v2 datatype name of an array (unicode strings count as BYTES)."""
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        raise InvalidInput(f"unsupported tensor dtype {array.dtype}") from None


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """Where a tensor lies in a registered shared-memory region: Triton's
    ``shared_memory_region``, ``shared_memory_offset`` (into the region) and
    ``shared_memory_byte_size`` parameters, as a client sent them (checked against the region
    by ``gateway.shared_memory``)."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class SharedInput:
    """An input whose data lies in shared memory: what the body says of it."""

    datatype: str
    shape: tuple[int, ...]
    ref: SharedMemoryRef


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for, whether it wants it as binary data (or written into
    a shared-memory region, ``shared``), and whether as its top ``classification`` classes
    (Triton's classification extension; 0: the tensor)."""

    name: str
    binary: bool | None = None  # None: follow the request's binary_data_output default
    shared: SharedMemoryRef | None = None
    classification: int = 0


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request: named numpy inputs plus what to send back."""

    inputs: dict[str, np.ndarray[Any, Any]]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    # Inputs in shared memory, until ``gateway.shared_memory`` resolves them into ``inputs``
    # (views of the mapping), and where outputs asked for in shared memory are to be written.
    shared_inputs: dict[str, SharedInput] = field(default_factory=dict)
    shared_targets: dict[str, memoryview] = field(default_factory=dict)

    @property
    def timeout_us(self) -> int | None:
        """Triton's per-request ``timeout`` parameter, in microseconds (0 or absent: none)."""
        value = self.parameters.get("timeout")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return None

    @property
    def priority(self) -> int:
        """Triton's per-request ``priority`` parameter (0 or absent: the model's default level;
        1 is the highest). Checked by the codecs; anything else reads as 0."""
        value = self.parameters.get("priority")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return 0


@dataclass(slots=True)
class InferResponse:
    """The result of one inference request."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray[Any, Any]]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)  # outputs written into shared memory
