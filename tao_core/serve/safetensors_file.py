"""Read a safetensors file with plain reads, never a memory map: what a running server needs.

``safetensors.safe_open`` maps the file; if another process truncates it while tensors are read (a model
directory being written again, ``save_pretrained`` over the one being reloaded), touching the mapping
kills the whole process with SIGBUS. Here each tensor is read with ``preadv`` into its own buffer, so a
file cut short is an error naming it, and :meth:`SafetensorsFile.changed` tells a reader whether the
path now holds another file or other bytes than when it was opened (written meanwhile). A path that is
not a regular file (a FIFO, a device) is refused before it is opened, so no read can block forever.

The format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data, offsets counted from its start.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import torch

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsError(ValueError):
    """The file is not a complete safetensors file; the message says what is wrong."""


class SafetensorsFile:
    """One safetensors file opened for reading tensors one at a time (a context manager)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not stat.S_ISREG(os.stat(self.path).st_mode):
            raise SafetensorsError("not a regular file")
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise SafetensorsError("not a regular file")
            self._identity = _identity(st)
            self._entries, self._data_start = self._header(st.st_size)
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read now; SafetensorsError when the file ends before its last byte."""
        entry = self._entries[key]
        dtype, (begin, end) = DTYPES[entry["dtype"]], entry["data_offsets"]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        buf = bytearray(end - begin)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = os.preadv(self._fd, [view[got:]], self._data_start + begin + got)
            if n == 0:
                raise SafetensorsError(f"the file ends inside tensor {key!r} (cut short while being read?)")
            got += n
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])

    def changed(self) -> bool:
        """Whether the path now names another file, or this one was written since it was opened."""
        try:
            return _identity(os.stat(self.path)) != self._identity
        except OSError:
            return True

    def _header(self, size: int) -> tuple[dict[str, dict[str, Any]], int]:
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise SafetensorsError(f"{size} bytes: too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"its header claims {n} bytes, the file holds {size}")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (ValueError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError("its header is not a JSON object")
        header.pop("__metadata__", None)
        data_bytes = size - 8 - n
        for key, entry in header.items():
            _check_entry(key, entry, data_bytes)
        return header, 8 + n


def _check_entry(key: str, entry: Any, data_bytes: int) -> None:
    ok = (isinstance(entry, dict) and entry.get("dtype") in DTYPES and isinstance(entry.get("shape"), list)
          and all(type(d) is int and d >= 0 for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
          and len(entry["data_offsets"]) == 2 and all(type(o) is int for o in entry["data_offsets"]))
    if not ok:
        raise SafetensorsError(f"header entry {key!r} is not {{dtype, shape, data_offsets}} of a known dtype")
    begin, end = entry["data_offsets"]
    size = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
    if not 0 <= begin <= end <= data_bytes or end - begin != size:
        raise SafetensorsError(f"tensor {key!r} claims bytes [{begin}, {end}) of {data_bytes}; its shape "
                               f"{entry['shape']} needs {size} (the file is cut short or corrupt)")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
