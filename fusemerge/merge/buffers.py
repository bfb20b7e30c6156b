"""Reused read buffers for the streaming engine.

Reading a tensor into fresh memory costs a page fault (and the kernel zeroing a page) per 4 KiB: on our
machines that made reads of page-cached shards 6-7x slower than `readinto` a reused buffer (the I/O floor
of bench/io_floor.py), and it is most of what linear and task arithmetic spend beyond the floor. A merge's
tensors come in a handful of sizes, so buffers released after a tensor is merged are handed to the next
read of the same size. Idle buffers are bounded: before a new buffer is allocated, idle ones are freed
until idle + in use + the new one fit in `limit`, so the pool never holds more than the prefetch budget's
worth of memory beyond what is being read and merged anyway (peak RSS stays where it was).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class BufferPool:
    """uint8 CPU buffers by exact size: `take` one, `give` it back when nothing reads it any more."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._idle: OrderedDict[int, torch.Tensor] = OrderedDict()  # by data_ptr, oldest first
        self._idle_bytes = 0
        self._in_use = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        import torch

        with self._lock:
            for key, buf in self._idle.items():
                if buf.numel() == nbytes:
                    del self._idle[key]
                    self._idle_bytes -= nbytes
                    self._in_use += nbytes
                    return buf
            while self._idle and self._idle_bytes + self._in_use + nbytes > self.limit:
                _, old = self._idle.popitem(last=False)
                self._idle_bytes -= old.numel()
            self._in_use += nbytes
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._in_use -= buf.numel()
            if self._idle_bytes + self._in_use + buf.numel() <= self.limit:
                self._idle[buf.data_ptr()] = buf
                self._idle_bytes += buf.numel()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes
