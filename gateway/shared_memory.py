"""System shared memory: Triton's ``system_shared_memory`` extension, for clients on this host.

A client creates a POSIX shared-memory object (``/dev/shm/<key>``), registers a region of it
under a name, and then names that region in an input's or output's parameters instead of sending
the tensor: inputs are read as numpy views of the mapping (no copy before ONNX Runtime), outputs
are written into it. Every front end (REST JSON, REST binary, gRPC) decodes those parameters into
``InferRequest.shared_inputs`` / ``RequestedOutput.shared``; ``DataPlane.submit`` resolves them
here (``resolve``), in one place, and ``Pending`` writes the outputs (``write_outputs``).

Why ``os.open`` + ``mmap`` and not ``multiprocessing.shared_memory``: attaching with the latter
registers the object with the resource tracker, which unlinks it when this process exits: the
gateway would destroy its clients' memory.

Safety: every offset and size is checked against the region, and the region against the
object's size now, for every request (once for its references in a row to one region): a read
past the end of a shrunk object would be SIGBUS, not an exception.
Unregistering while requests use a region is safe: they hold views of the mapping, and the
mapping is unmapped only when the last of them is gone (``mmap.close`` refuses while views
exist; then the last reference unmaps it). A client that shrinks its object while a request
reads it can still crash the process: shared memory is for processes this host trusts (see the
README's trust model).
"""

from __future__ import annotations

import math
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import InvalidInput, RegionExists, SharedMemoryError, UnknownRegion
from gateway.protocol.tensors import check_bool, join_bytes, split_bytes
from gateway.protocol.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    numpy_dtype,
)

SHM_DIR = Path("/dev/shm")
MAX_NAME_CHARS = 255  # NAME_MAX: a key is one file name under /dev/shm


def _key_file(key: object, name: str) -> str:
    """The file name under /dev/shm of a POSIX shm key (``/name`` or ``name``), refusing
    anything that is not one plain name (no path, no ``..``)."""
    if not isinstance(key, str):
        raise SharedMemoryError(
            f"failed to register shared memory region '{name}': 'key' must be a string"
        )
    bare = key[1:] if key.startswith("/") else key
    if not bare or bare in (".", "..") or "/" in bare or "\x00" in bare:
        raise SharedMemoryError(
            f"failed to register shared memory region '{name}': invalid key {key[:64]!r} "
            "(a POSIX shared memory name: '/name')"
        )
    if len(bare) > MAX_NAME_CHARS:
        raise SharedMemoryError(
            f"failed to register shared memory region '{name}': key longer than "
            f"{MAX_NAME_CHARS} characters"
        )
    return bare


def _size(value: object, field_name: str, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SharedMemoryError(
            f"failed to register shared memory region '{name}': '{field_name}' must be a "
            "non-negative integer"
        )
    return value


@dataclass(slots=True)
class Region:
    """One registered region: ``byte_size`` bytes at ``offset`` of the object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap = field(repr=False)
    end: int = field(init=False, repr=False)  # the object's least size: offset + byte_size

    def __post_init__(self) -> None:
        self.end = self.offset + self.byte_size

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }

    def view(self, offset: int, byte_size: int) -> memoryview:
        """``byte_size`` bytes at ``offset`` into the region, as a view of the mapping (which
        it keeps mapped). Refused if outside the region, or if the object shrank since."""
        self.check(offset, byte_size)
        self.check_object()
        start = self.offset + offset
        return memoryview(self.mapping)[start : start + byte_size]

    def check(self, offset: int, byte_size: int) -> None:
        """Refuse ``byte_size`` bytes at ``offset`` unless they lie within the region."""
        if offset >= self.byte_size:
            raise SharedMemoryError(f"Invalid offset for shared memory region: '{self.name}'")
        if offset + byte_size > self.byte_size:
            raise SharedMemoryError(
                f"Invalid offset + byte size for shared memory region: '{self.name}' "
                f"({offset} + {byte_size} > {self.byte_size} bytes)"
            )

    def check_object(self) -> None:
        """Refuse the region if its object shrank below it since it was registered (reading
        the mapping past the object's end is SIGBUS), or if it was unregistered meanwhile."""
        try:
            now = self.mapping.size()  # fstat: the object may have been truncated since
        except (OSError, ValueError):  # closed: unregistered meanwhile
            raise UnknownRegion(f"Unable to find shared memory region: '{self.name}'") from None
        if now < self.end:
            raise SharedMemoryError(
                f"shared memory region '{self.name}': its object '{self.key}' shrank to {now} "
                f"bytes since it was registered"
            )

    def close(self) -> None:
        """Unmap now if no request holds a view; else the last view's release unmaps it."""
        try:
            self.mapping.close()
        except BufferError:
            pass  # views exist (requests in flight): the mapping goes with the last of them


class SharedMemoryRegistry:
    """The registered system shared-memory regions, by name (Triton's region namespace)."""

    def __init__(self, max_regions: int = 256, directory: Path = SHM_DIR) -> None:
        """``max_regions`` bounds the mappings (and file descriptors) clients can make the
        gateway hold; 0 turns the extension off."""
        self.max_regions = max_regions
        self.directory = directory
        self._regions: dict[str, Region] = {}

    def __iter__(self) -> Iterator[Region]:
        return iter(list(self._regions.values()))

    def register(self, name: str, key: object, offset: object, byte_size: object) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the object ``key`` as region ``name``."""
        if not name:
            raise SharedMemoryError("a shared memory region needs a name")
        if self.max_regions == 0:
            raise SharedMemoryError(
                f"failed to register shared memory region '{name}': system shared memory is "
                "turned off on this gateway (shared_memory_max_regions = 0)"
            )
        if name in self._regions:
            raise RegionExists(f"shared memory region '{name}' already in manager")
        if len(self._regions) >= self.max_regions:
            raise SharedMemoryError(
                f"failed to register shared memory region '{name}': {self.max_regions} regions "
                "are registered already (shared_memory_max_regions)"
            )
        bare = _key_file(key, name)
        start = _size(offset, "offset", name)
        size = _size(byte_size, "byte_size", name)
        assert isinstance(key, str)
        if size == 0:
            raise SharedMemoryError(
                f"failed to register shared memory region '{name}': 'byte_size' must be positive"
            )
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.directory / bare, flags)
        except OSError:
            raise SharedMemoryError(
                f"Unable to open shared memory region: '{key}' (region '{name}')"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SharedMemoryError(
                    f"failed to register shared memory region '{name}': '{key}' is not a shared "
                    "memory object"
                )
            if start + size > info.st_size:
                raise SharedMemoryError(
                    f"failed to register shared memory region '{name}': offset {start} + "
                    f"byte_size {size} is past the end of '{key}' ({info.st_size} bytes)"
                )
            try:  # from 0: an mmap offset must be page-aligned, a region's need not be
                mapping = mmap.mmap(
                    fd, start + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                )
            except (OSError, ValueError) as exc:
                raise SharedMemoryError(
                    f"failed to register shared memory region '{name}': {exc}"
                ) from None
        finally:
            os.close(fd)  # the mapping keeps its own descriptor
        self._regions[name] = Region(name, key, start, size, mapping)

    def region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise UnknownRegion(f"Unable to find shared memory region: '{name}'")
        return region

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every region's status, or one region's (Triton's wording when it is unknown)."""
        if not name:
            return [r.status() for r in self._regions.values()]
        region = self._regions.get(name)
        if region is None:
            raise UnknownRegion(f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def unregister(self, name: str | None = None) -> None:
        """Forget one region (an unknown name is no error, as Triton), or all with None."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.close()

    def close(self) -> None:
        self.unregister()

    # -- inference ----------------------------------------------------------------------------

    def resolve(self, request: InferRequest) -> None:
        """Turn a decoded request's shared-memory references into inputs (views of the
        mappings, no copy) and output targets; every offset and size checked.

        Written flat (the checks inline, ``Region.check`` only to refuse): this runs for every
        shared-memory request, and a Python call costs about as much as a check. The object's
        size (an ``fstat``, ~1 us) is read once for references in a row to the same region
        (tritonclient's examples put both inputs in one region and both outputs in another),
        not once per reference; an input is read straight from the mapping at its offset (no
        slice of a view of it first)."""
        regions = self._regions
        checked = None  # the region whose object was last checked, in this request
        for name, shared in request.shared_inputs.items():
            datatype, shape, ref = shared.datatype, shared.shape, shared.ref
            dtype = DATATYPES.get(datatype)
            if dtype is None:  # the codecs let only known names through
                dtype = numpy_dtype(datatype)
            region = regions.get(ref.region)
            if region is None:
                raise UnknownRegion(f"Unable to find shared memory region: '{ref.region}'")
            offset, size = ref.offset, ref.byte_size
            if offset >= region.byte_size or offset + size > region.byte_size:
                region.check(offset, size)  # raises
            if region is not checked:  # the object's size: ``check_object`` inline
                try:
                    now = region.mapping.size()
                except (OSError, ValueError):
                    now = -1
                if now < region.end:
                    region.check_object()  # raises
                checked = region
            count = math.prod(shape)  # not np.prod: a few us per input on a tuple
            start = region.offset + offset
            if datatype == "BYTES":
                view = memoryview(region.mapping)[start : start + size]
                try:
                    request.inputs[name] = split_bytes(view, count, name).reshape(shape)
                except InvalidInput as exc:
                    raise SharedMemoryError(
                        f"{exc.message} (shared memory region '{ref.region}')"
                    ) from None
                continue
            expected = count * dtype.itemsize
            if size != expected:
                raise SharedMemoryError(
                    f"input '{name}': shared_memory_byte_size {size} of region "
                    f"'{ref.region}' does not match shape {list(shape)} of "
                    f"{datatype} ({expected} bytes)"
                )
            # ``frombuffer`` holds an export of the mapping (what keeps it mapped while the
            # array lives); ``np.ndarray(buffer=...)`` would not.
            array = np.frombuffer(region.mapping, dtype, count, start).reshape(shape)
            if dtype.kind == "b":
                check_bool(array, name)
            request.inputs[name] = array
        for output in request.outputs or ():
            target = output.shared
            if target is not None:
                region = regions.get(target.region)
                if region is None:
                    raise UnknownRegion(f"Unable to find shared memory region: '{target.region}'")
                offset, size = target.offset, target.byte_size
                if offset >= region.byte_size or offset + size > region.byte_size:
                    region.check(offset, size)  # raises
                if region is not checked:
                    try:
                        now = region.mapping.size()
                    except (OSError, ValueError):
                        now = -1
                    if now < region.end:
                        region.check_object()  # raises
                    checked = region
                start = region.offset + offset
                request.shared_targets[output.name] = memoryview(region.mapping)[
                    start : start + size
                ]


def write_outputs(request: InferRequest, response: InferResponse) -> None:
    """Write the outputs asked for in shared memory into their regions, and mark them so the
    front ends send no data for them (as Triton)."""
    for name, target in request.shared_targets.items():
        array = response.outputs.get(name)
        if array is None:
            continue
        # one memoryview slice assignment: no numpy round trip (~1.4 us an output)
        if array.dtype.kind in "OSU":
            data = memoryview(join_bytes(array))
        else:  # a row of the batch is C-contiguous already: no copy here
            contiguous = np.ascontiguousarray(array)  # (a view of zero bytes cannot be cast)
            data = contiguous.data.cast("B") if contiguous.size else memoryview(b"")
        size = data.nbytes
        if size > len(target):
            raise SharedMemoryError(
                f"shared memory size specified with the request for output '{name}' "
                f"({len(target)} bytes) should be at least {size} bytes to hold the results"
            )
        if size:
            target[:size] = data
        response.shared.add(name)


__all__ = ["Region", "SharedMemoryRegistry", "write_outputs"]
