"""Write a safetensors file straight from the tensors' memory, then fsync it.

safetensors' own `save_file` first copies every tensor into a Python `bytes` object (a second 4.9 GB
for a ViT-L checkpoint) while holding the interpreter lock; here each tensor's bytes go to the file
in slices, and the lock is released during each write, so a background save leaves the training
thread free. The files are plain safetensors: `safetensors.torch.load_file` reads them.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}
_SLICE = 64 << 20  # bytes per write call


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes without a copy (the tensor must stay alive while they are used)."""
    flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def header_of(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (JSON padded with spaces to 8 bytes) for tensors written in dict order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> int:
    """Write CPU tensors to `path` as safetensors and fsync it; return the bytes written."""
    header = header_of(tensors, metadata)
    written = 0
    with open(path, "wb") as fh:
        written += fh.write(struct.pack("<Q", len(header)) + header)
        for tensor in tensors.values():
            data = tensor_bytes(tensor)
            for start in range(0, len(data), _SLICE):
                written += fh.write(data[start:start + _SLICE])
        fh.flush()
        os.fsync(fh.fileno())
    return written


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)
