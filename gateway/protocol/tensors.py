"""Rules every v2 codec applies to a tensor, whatever the transport: names, shapes, BYTES
framing, fixed-size binary data and the request parameters the gateway acts on.

Shared by the REST codec (``gateway.protocol.codec``), the gRPC codec and the client codec for
other v2 hosts, so a rule is written once: each check runs before anything is allocated, and
work is bounded by the declared shape, never by the body.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from gateway.errors import InvalidInput
from gateway.protocol.types import SharedMemoryRef

__all__ = [
    "MAX_CLASSES",
    "MAX_DIMS",
    "MAX_ELEMENTS",
    "MAX_NAME_CHARS",
    "check_bool",
    "check_classification",
    "check_name",
    "check_parameters",
    "check_shape",
    "join_bytes",
    "shared_memory_ref",
    "split_bytes",
    "tensor_from_buffer",
]

MAX_DIMS = 32
MAX_NAME_CHARS = 255
MAX_ELEMENTS = 1 << 28  # elements of one tensor
_LEN = struct.Struct("<I")


def check_name(value: object, what: str) -> str:
    """A tensor's name as a client gave it: a string of 1 to 255 characters without NUL."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME_CHARS or "\x00" in value:
        raise InvalidInput(f"{what} is not a valid tensor name")
    return value


def check_shape(value: object, name: str, max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    """A tensor's shape as the client declared it, checked before anything is allocated.

    Every dimension is bounded on its own, not only their product: ``[1, 0, 2**64 - 1]`` holds
    no element, but no array of that shape can exist.
    """
    if not isinstance(value, list | tuple) or len(value) > MAX_DIMS:
        raise InvalidInput(f"input '{name}': 'shape' must be a list of at most {MAX_DIMS} integers")
    for dim in value:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise InvalidInput(
                f"input '{name}': shape {list(value)} must hold non-negative integers"
            )
        if dim > max_elements:
            raise InvalidInput(
                f"input '{name}': shape {list(value)} is too large (limit {max_elements})"
            )
    count = math.prod(value)
    if count > max_elements:
        raise InvalidInput(f"input '{name}': shape {list(value)} is too large ({count} elements)")
    return tuple(value)


def split_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray[Any, Any]:
    """Length-prefixed BYTES elements (4-byte little-endian length, then the bytes) -> a flat
    object array of exactly ``count`` elements.

    The one reader of this framing (REST, gRPC, v2 hosts' answers). It stops at the first element
    past ``count``: a small shape over a huge body costs one element's work, not the body's.
    """
    view = memoryview(buffer)
    size = len(view)
    if size < 4 * count:
        raise InvalidInput(
            f"input '{name}': {size} bytes cannot hold the {count} BYTES elements of its shape"
        )
    items: list[bytes] = []
    offset = 0
    while offset < size:
        if len(items) == count:
            raise InvalidInput(
                f"input '{name}': BYTES data holds more than the {count} elements of its shape"
            )
        if offset + 4 > size:
            raise InvalidInput(f"input '{name}': truncated BYTES length prefix")
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInput(f"input '{name}': BYTES element length {length} overruns the data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInput(
            f"input '{name}': got {len(items)} BYTES elements, its shape needs {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def join_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """A BYTES tensor (bytes or str elements) as length-prefixed bytes."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def tensor_from_buffer(
    buffer: bytes | memoryview, dtype: np.dtype[Any], shape: tuple[int, ...], name: str
) -> np.ndarray[Any, Any]:
    """Fixed-size binary tensor data as an array (no copy); BOOL bytes must be 0 or 1, as
    Triton's, or a later ``not`` or comparison would see values no bool has."""
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if dtype.kind == "b":
        check_bool(array, name)
    return array


def check_bool(array: np.ndarray[Any, Any], name: str) -> None:
    """Refuse BOOL data with bytes other than 0 or 1 (Triton's rule)."""
    if array.size and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"input '{name}': BOOL data must be bytes 0 or 1")


MAX_CLASSES = 1 << 32  # Triton reads the count as a uint32


def check_classification(params: dict[str, Any], name: str) -> int:
    """An output's ``classification`` parameter (Triton's classification extension): how many
    top classes to answer with; 0 (or none) for the tensor itself."""
    count = params.get("classification", 0)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < MAX_CLASSES:
        raise InvalidInput(
            f"output '{name}': 'classification' must be a non-negative integer (classes)"
        )
    return count


def check_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Request parameters the gateway acts on, checked: a ``timeout`` it cannot honour is the
    client's error, not a request that silently waits without one."""
    timeout = params.get("timeout")
    if timeout is not None and (
        not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0
    ):
        raise InvalidInput("parameter 'timeout' must be a non-negative integer (microseconds)")
    priority = params.get("priority")
    if priority is not None and (
        not isinstance(priority, int) or isinstance(priority, bool) or priority < 0
    ):
        raise InvalidInput(
            "parameter 'priority' must be a non-negative integer (0: the model's default level)"
        )
    return params


def _non_negative(value: object, key: str, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"{what}: '{key}' must be a non-negative integer")
    return value


def shared_memory_ref(params: dict[str, Any], what: str) -> SharedMemoryRef | None:
    """The shared-memory parameters of an input or a requested output (``what`` names it), or
    None when it has none. As Triton: region and byte size together or neither, the offset
    optional (0)."""
    region = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset")
    if region is None and size is None and offset is None:
        return None
    if region is None or size is None:
        raise InvalidInput(
            f"{what}: 'shared_memory_region' and 'shared_memory_byte_size' must be given together"
        )
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{what}: 'shared_memory_region' must be a non-empty string")
    return SharedMemoryRef(
        region=region,
        byte_size=_non_negative(size, "shared_memory_byte_size", what),
        offset=0 if offset is None else _non_negative(offset, "shared_memory_offset", what),
    )
