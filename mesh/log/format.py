"""The on-disk format of the durable log: pure framing and parsing functions, no I/O.

A segment file is a sequence of *record batches* (one batch per ``append``/``append_many``
call, split at ``MAX_BATCH_BYTES``). Every batch is self-describing and checksummed::

    offset size field
    0      4    length        u32 LE, total batch bytes including this field
    4      4    crc           u32 LE, CRC-32 (zlib's polynomial) of bytes [8, length)
    8      1    magic         0xA7
    9      1    version       1
    10     2    flags         u16 LE, 0 (reserved; a reader refuses a batch with other bits)
    12     8    base_offset   u64 LE, offset of the batch's first record
    20     8    timestamp_ns  i64 LE, one timestamp for every record of the batch
    28     4    count         u32 LE, number of records (>= 1)
    32     4*n  lengths       u32 LE each, payload length of record i
    ...         payloads      the payloads, concatenated

Lengths come before payloads so that a reader splits a batch with one array cast and slices,
without a Python-level loop per header (what makes replay >1M records/s).

The sparse index file beside a segment is a flat array of 24-byte entries
``(offset u64, position u64, timestamp_ns i64)``, little-endian, one per batch start at least
every ``index_interval_bytes`` (and always the first and, once sealed, the last batch).
The full specification is docs/protocol.md.
"""

from __future__ import annotations

import binascii
import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import accumulate
from typing import NamedTuple

# binascii.crc32, not zlib.crc32: the same CRC-32, but zlib's releases the GIL for buffers over
# 5 KiB, and getting it back waits for another busy thread's switch interval (5 ms). Measured
# with one busy thread beside it: 659 µs per 110 KB batch with zlib.crc32 against 27 µs
# (39 µs alone); the pipeline producer's push thread paid that on every push_many.
_crc32 = binascii.crc32

MAGIC = 0xA7
VERSION = 1
HEADER_SIZE = 32
#: Largest batch a writer produces; ``append_many`` splits bigger calls. A reader accepts
#: up to ``MAX_FRAME_BYTES`` so that a damaged length cannot make it allocate gigabytes.
MAX_BATCH_BYTES = 1 << 20
MAX_RECORD_BYTES = 64 << 20
MAX_FRAME_BYTES = MAX_RECORD_BYTES + HEADER_SIZE + 4

_PREFIX = struct.Struct("<II")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<IIBBHQqI")
_TAIL = struct.Struct("<BBHQqI")
_TAIL1 = struct.Struct("<BBHQqII")  # tail of a one-record batch, with its single length
INDEX_ENTRY = struct.Struct("<QQq")
INDEX_ENTRY_SIZE = INDEX_ENTRY.size
#: The bytes at header position 8..12 of every valid batch: what resynchronisation looks for.
SYNC_PATTERN = bytes([MAGIC, VERSION, 0, 0])

_BIG_ENDIAN = sys.byteorder == "big"


class FrameError(Exception):
    """A batch failed a framing or checksum check (internal; the log maps it to its errors).

    Attributes:
        reason: what check failed.
        incomplete: True when the bytes simply end before the batch does (a torn tail, or a
            write still in progress), False when the bytes present are wrong.
    """

    def __init__(self, reason: str, *, incomplete: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.incomplete = incomplete


class BatchHeader(NamedTuple):
    """The decoded fixed header of one batch."""

    length: int
    crc: int
    base_offset: int
    timestamp_ns: int
    records: int

    @property
    def next_offset(self) -> int:
        """The offset following the batch's last record."""
        return self.base_offset + self.records


def segment_name(base_offset: int) -> str:
    """File name of the segment whose first record has ``base_offset``."""
    return f"{base_offset:020d}.log"


def index_name(base_offset: int) -> str:
    """File name of the sparse index of the segment with ``base_offset``."""
    return f"{base_offset:020d}.index"


def parse_segment_name(name: str) -> int | None:
    """The base offset encoded in a segment file name, or None if it is not one."""
    if len(name) != 24 or not name.endswith(".log") or not name[:20].isdigit():
        return None
    return int(name[:20])


def encode_one(base_offset: int, timestamp_ns: int, payload: bytes) -> bytes:
    """Frame a single payload as a one-record batch (the ``append`` fast path)."""
    body = _TAIL1.pack(MAGIC, VERSION, 0, base_offset, timestamp_ns, 1, len(payload)) + payload
    return _PREFIX.pack(len(body) + 8, _crc32(body)) + body


def encode_batch(base_offset: int, timestamp_ns: int, payloads: Sequence[bytes]) -> bytes:
    """Frame ``payloads`` (at least one) as one batch starting at ``base_offset``."""
    n = len(payloads)
    lengths = array("I", map(len, payloads))
    if _BIG_ENDIAN:  # pragma: no cover - the format is little-endian everywhere
        lengths.byteswap()
    body = b"".join(
        (_TAIL.pack(MAGIC, VERSION, 0, base_offset, timestamp_ns, n), lengths.tobytes(), *payloads)
    )
    return _PREFIX.pack(len(body) + 8, _crc32(body)) + body


def read_header(buf: bytes | memoryview, pos: int, end: int | None = None) -> BatchHeader:
    """Decode and sanity-check the header of the batch at ``pos`` (checksum not verified).

    Raises:
        FrameError: the header is cut short (``incomplete``) or holds impossible values.
    """
    if end is None:
        end = len(buf)
    if end - pos < HEADER_SIZE:
        raise FrameError(f"header cut short ({end - pos} of {HEADER_SIZE} bytes)",
                         incomplete=True)
    length, crc, magic, version, flags, base, ts, count = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        raise FrameError(f"bad magic 0x{magic:02x}")
    if version != VERSION:
        raise FrameError(f"unknown batch version {version}")
    if flags != 0:
        raise FrameError(f"unknown flags 0x{flags:04x}")
    if count < 1 or length < HEADER_SIZE + 4 * count or length > MAX_FRAME_BYTES + 4 * count:
        raise FrameError(f"impossible length {length} for {count} records")
    if end - pos < length:
        raise FrameError(f"batch cut short ({end - pos} of {length} bytes)", incomplete=True)
    return BatchHeader(length, crc, base, ts, count)


def check_batch(buf: bytes | memoryview, pos: int, end: int | None = None) -> BatchHeader:
    """Decode the header at ``pos`` and verify the batch's checksum and record lengths.

    Raises:
        FrameError: see :func:`read_header`; also a checksum or length-table mismatch.
    """
    hdr = read_header(buf, pos, end)
    mv = memoryview(buf)
    if _crc32(mv[pos + 8 : pos + hdr.length]) != hdr.crc:
        raise FrameError("checksum mismatch")
    if hdr.records == 1:  # the common single-append batch: no length table to build
        if _U32.unpack_from(buf, pos + HEADER_SIZE)[0] != hdr.length - HEADER_SIZE - 4:
            raise FrameError("record lengths do not add up to the batch length")
        return hdr
    lens = _lengths(mv, pos, hdr.records)
    if sum(lens) != hdr.length - HEADER_SIZE - 4 * hdr.records:
        raise FrameError("record lengths do not add up to the batch length")
    return hdr


def _lengths(mv: memoryview, pos: int, count: int) -> array[int]:
    lens = array("I")
    lens.frombytes(mv[pos + HEADER_SIZE : pos + HEADER_SIZE + 4 * count])
    if _BIG_ENDIAN:  # pragma: no cover
        lens.byteswap()
    return lens


def batch_payloads(buf: bytes, pos: int, hdr: BatchHeader, skip: int = 0,
                   limit: int | None = None) -> list[bytes]:
    """The payloads of a checked batch at ``pos``, from record ``skip``, at most ``limit``."""
    start = pos + HEADER_SIZE + 4 * hdr.records
    stop = hdr.records if limit is None else min(hdr.records, skip + limit)
    if hdr.records == 1:
        return [buf[start : pos + hdr.length]] if skip == 0 and stop == 1 else []
    bounds = list(accumulate(_lengths(memoryview(buf), pos, hdr.records), initial=start))
    return [buf[a:b] for a, b in zip(bounds[skip:stop], bounds[skip + 1 : stop + 1], strict=True)]


def find_next_batch(buf: bytes, start: int, end: int, min_offset: int) -> tuple[int, BatchHeader] | None:
    """Find the first valid batch at or after byte ``start`` with base offset >= ``min_offset``.

    Used to resynchronise after a damaged batch whose length field cannot be trusted: it
    scans for the constant header bytes and accepts a candidate only if its checksum holds.
    """
    pos = start
    while True:
        hit = buf.find(SYNC_PATTERN, pos + 8, end)
        if hit < 0:
            return None
        cand = hit - 8
        pos = hit - 7
        if cand < start:
            continue
        try:
            hdr = check_batch(buf, cand, end)
        except FrameError:
            continue
        if hdr.base_offset >= min_offset:
            return cand, hdr


def encode_index_entry(offset: int, position: int, timestamp_ns: int) -> bytes:
    """One 24-byte sparse index entry."""
    return INDEX_ENTRY.pack(offset, position, timestamp_ns)


def decode_index(data: bytes) -> list[tuple[int, int, int]]:
    """Decode a whole index file; a torn final entry (power cut) is ignored."""
    usable = len(data) - len(data) % INDEX_ENTRY_SIZE
    return list(INDEX_ENTRY.iter_unpack(data[:usable]))
