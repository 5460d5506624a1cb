"""GPUDirect Storage tier: the disk tier's files, with payloads moved by kvikio (cuFile).

Same directory layout, atomic rename, index and budget as ``disk``; only the payload
transfer differs: ``kvikio.CuFile`` DMAs between the file and GPU memory (in kvikio's
POSIX compatibility mode when the GDS driver is absent). The header stays a small host
read/write. kvikio needs a CUDA driver even in compatibility mode, so without a GPU
this backend refuses to start with a clear message, and the store lets the disk backend
serve the directory instead (see ``store.build``).
"""

from __future__ import annotations

import os
from typing import Any

from backends.base import BackendUnavailable
from backends.disk import DiskBackend
from kvcore.chunk import HEADER_READ_SIZE, Chunk, ChunkError, decode_header, encode_prefix


def _kvikio() -> Any:
    try:
        import kvikio
    except ImportError as exc:
        raise BackendUnavailable("backend 'gds' needs kvikio: pip install 'kvstore[gpu]'") from exc
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("backend 'gds' needs a CUDA GPU and driver; none found here")
    return kvikio


class GDSBackend(DiskBackend):
    """Chunk files under ``path`` whose payloads move between file and GPU via cuFile."""

    name = "gds"

    def __init__(
        self,
        path: str,
        capacity: int,
        policy: str = "s3fifo",
        fsync: bool = True,
        o_direct: bool = False,
        open_files: int = 1024,
    ) -> None:
        self._kv = _kvikio()
        super().__init__(
            path, capacity, policy=policy, fsync=fsync, o_direct=False, open_files=open_files
        )

    def _write_file(self, path: str, chunk: Chunk) -> int:
        prefix = encode_prefix(chunk.header, align=HEADER_READ_SIZE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, prefix, 0)
        finally:
            os.close(fd)
        payload = _device_or_host(chunk.payload)
        with self._kv.CuFile(path, "r+") as f:
            written = f.pwrite(payload, chunk.header.nbytes, file_offset=len(prefix)).get()
        if written != chunk.header.nbytes:
            raise OSError(f"cuFile wrote {written} of {chunk.header.nbytes} bytes")
        if self.fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return len(prefix) + chunk.header.nbytes

    def _read_file(self, path: str, out: Any) -> Chunk:
        import torch

        with open(path, "rb") as f:
            header, offset = decode_header(f.read(HEADER_READ_SIZE))
            size = os.fstat(f.fileno()).st_size
        if offset + header.nbytes > size:
            raise ChunkError(f"chunk file truncated: {size} bytes, needs {offset + header.nbytes}")
        if out is None:
            out = torch.empty(header.nbytes, dtype=torch.uint8, device="cuda")
        dst = (
            out.reshape(-1).view(torch.uint8)[: header.nbytes]
            if isinstance(out, torch.Tensor)
            else out
        )
        with self._kv.CuFile(path, "r") as f:
            n = f.pread(dst, header.nbytes, file_offset=offset).get()
        if n != header.nbytes:
            raise ChunkError(f"chunk file short read: {n} of {header.nbytes} bytes")
        return Chunk(header, dst)


def _device_or_host(payload: Any) -> Any:
    """What cuFile accepts: a CUDA tensor as is, a host buffer as a numpy array."""
    import numpy as np

    if type(payload).__name__ == "Tensor":
        return payload.reshape(-1).view(__import__("torch").uint8)
    return np.frombuffer(payload, dtype=np.uint8)
