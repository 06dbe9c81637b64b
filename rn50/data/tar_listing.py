"""Where every member of a tar lies, found with few large reads (local disk or S3, no Ray).

On S3 every read is a request with ~30 ms of latency, so reading a tar's headers one small read
at a time (what `tarfile` over an unbuffered file does: one seek + read per member) costs one
request per image: 1.3 M sequential requests, hours, for ILSVRC2012_img_train.tar. Here:

- `tar_members` walks a tar's headers with an adaptive block reader: after a small member it
  reads ahead `BIG_BLOCK` bytes (many small members per request: the flat val tar), after a
  large one `SMALL_BLOCK` (one request per header, skipping the data: the 1,000 ~140 MB class
  tars inside the train tar, 1,000 requests in all).
- `members_of_range` reads a byte range whole, in a few `BIG_BLOCK`-sized requests at most, and
  lists the inner tars in it from memory: one class tar costs one or a few requests.
"""
from __future__ import annotations

import io
import tarfile
from typing import Iterator

SMALL_BLOCK = 1 << 16      # one tar header plus slack: used to jump over large members
BIG_BLOCK = 1 << 25        # 32 MB: ~250 ImageNet JPEGs per request, a few 100 ms on S3
SMALL_MEMBER = 1 << 22     # members under 4 MB are read through rather than jumped over
MAX_READ = 1 << 29         # a range read whole is split into requests of at most 512 MB


class TarListingError(ValueError):
    """A tar (or a tar inside one) that cannot be parsed; the message names it."""


class BlockReader(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of a random-access file that
    reads `block` bytes at a time and serves reads inside the last block from memory."""

    def __init__(self, handle, start: int, size: int, block: int = SMALL_BLOCK):
        self.handle, self.start, self.size, self.pos = handle, start, size, 0
        self.block, self.cached_at, self.cached = block, 0, b""
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.pos))
        if count == 0:
            return 0
        offset = self.pos - self.cached_at
        if offset < 0 or offset + count > len(self.cached):
            length = min(max(count, self.block), self.size - self.pos)
            self.cached = self.handle.read_at(length, self.start + self.pos)
            self.cached_at, offset = self.pos, 0
            self.requests += 1
        data = self.cached[offset:offset + count]
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _walk(archive: tarfile.TarFile, base: int, reader: BlockReader | None = None):
    for member in archive:
        if reader is not None:  # read through runs of small members, jump over large ones
            reader.block = BIG_BLOCK if member.size < SMALL_MEMBER else SMALL_BLOCK
        if member.isfile():
            yield member.name, base + member.offset_data, member.size


def tar_members(handle, start: int, size: int, what: str) -> Iterator[tuple[str, int, int]]:
    """(name, absolute data offset, size) of the regular files of the tar at [start, +size)."""
    reader = BlockReader(handle, start, size)
    try:
        with tarfile.open(fileobj=reader, mode="r:") as archive:  # seeks over data
            yield from _walk(archive, start, reader)
    except tarfile.TarError as err:
        raise TarListingError(f"{what} is not a readable tar ({err})") from None


class _Memory:
    """`read_at` over bytes already read, as zero-copy memoryview slices."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)

    def read_at(self, size: int, offset: int) -> memoryview:
        return self.data[offset:offset + size]


def read_range(handle, start: int, size: int) -> bytes:
    """Bytes [start, start + size) of `handle` in requests of at most MAX_READ bytes."""
    parts = [handle.read_at(min(MAX_READ, size - done), start + done)
             for done in range(0, size, MAX_READ)]
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) != size:
        raise TarListingError(f"read {len(data)} of {size} bytes at offset {start}: the file "
                              "is shorter than its tar headers say (truncated upload?)")
    return data


def members_of_range(handle, tars: list[tuple[str, int, int]],
                     what: str) -> list[list[tuple[str, int, int]]]:
    """The members of each inner tar (name, start, size), all lying in one contiguous range that
    is read whole: [[(member name, absolute data offset, size), ...] per inner tar]."""
    first = min(start for _, start, _ in tars)
    end = max(start + size for _, start, size in tars)
    data = read_range(handle, first, end - first)
    listed, memory = [], _Memory(data)
    for name, start, size in tars:
        view = BlockReader(memory, start - first, size)  # slices of one buffer: no copies
        try:
            with tarfile.open(fileobj=view, mode="r:") as archive:
                listed.append(list(_walk(archive, start)))
        except tarfile.TarError as err:
            raise TarListingError(f"{name} inside {what} is not a readable tar ({err})") from None
    return listed


def group_ranges(tars: list[tuple[str, int, int]], min_bytes: int) -> list[list[int]]:
    """Indices of `tars` (in file order) cut into runs of at least `min_bytes`: each run is one
    listing task, so small inner tars share a request and large ones get a task each."""
    groups, current, total = [], [], 0
    for index in sorted(range(len(tars)), key=lambda i: tars[i][1]):
        current.append(index)
        total += tars[index][2]
        if total >= min_bytes:
            groups.append(current)
            current, total = [], 0
    return groups + ([current] if current else [])
