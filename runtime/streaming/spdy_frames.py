"""SPDY/3.1 frames as far as the Kubernetes streaming protocols need them.

Control frames SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS and
WINDOW_UPDATE, and data frames; header blocks compressed with zlib and SPDY/3's preset
dictionary, one compressor and one decompressor per connection direction, kept across frames,
every block ending in a sync flush (what github.com/docker/spdystream, client-go's library,
writes and expects). Wire facts: /work/shared/streaming.md section 3.

Everything here is pure: bytes in, frames out, so the unit tests feed it frames captured from
spdystream (tests/unit/golden/spdy_spdystream_frames.hex).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .spdy_dictionary import HEADER_DICTIONARY

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes (1-11 are defined; these are the ones this server sends)
RST_PROTOCOL_ERROR = 1
RST_REFUSED_STREAM = 3
RST_CANCEL = 5

GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1

SETTINGS_INITIAL_WINDOW_SIZE = 7

MAX_DATA_LENGTH = (1 << 24) - 1    # the wire's limit
MAX_FRAME_IN = 1024 * 1024          # what this server accepts from a client in one frame
MAX_HEADER_BLOCK = 64 * 1024        # decompressed header block bytes accepted
MAX_HEADER_PAIRS = 128
MAX_SETTINGS = 64

Headers = dict[str, list[str]]


class FrameError(Exception):
    """The peer broke SPDY framing; the connection ends (GOAWAY PROTOCOL_ERROR)."""


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes = b""
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    assoc_id: int = 0
    priority: int = 0
    slot: int = 0
    flags: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    flags: int = 0


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    flags: int = 0


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    entries: tuple[tuple[int, int, int], ...] = ()   # (flags, id, value)
    flags: int = 0


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_id: int
    status: int = GOAWAY_OK


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


Frame = (DataFrame | SynStream | SynReply | HeadersFrame | RstStream | Settings | Ping | GoAway
         | WindowUpdate)


def encode_header_block(headers: Mapping[str, list[str]]) -> bytes:
    """The uncompressed block: u32 count, then u32-length-prefixed name and NUL-joined value."""
    out = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        n = name.lower().encode()
        v = b"\x00".join(x.encode() for x in values)
        out.append(struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def decode_header_block(raw: bytes) -> Headers:
    def take(pos: int, n: int) -> tuple[bytes, int]:
        if pos + n > len(raw):
            raise FrameError("header block truncated")
        return raw[pos:pos + n], pos + n

    cnt, pos = take(0, 4)
    (count,) = struct.unpack(">I", cnt)
    if count > MAX_HEADER_PAIRS:
        raise FrameError(f"header block with {count} pairs (at most {MAX_HEADER_PAIRS})")
    headers: Headers = {}
    for _ in range(count):
        ln, pos = take(pos, 4)
        name_b, pos = take(pos, struct.unpack(">I", ln)[0])
        ln, pos = take(pos, 4)
        value_b, pos = take(pos, struct.unpack(">I", ln)[0])
        try:
            name, value = name_b.decode(), value_b.decode()
        except UnicodeDecodeError as e:
            raise FrameError("header name or value is not UTF-8") from e
        if not name or name != name.lower():
            raise FrameError(f"header name {name!r} is empty or not lowercase")
        if name in headers:
            raise FrameError(f"header {name!r} repeated")
        headers[name] = value.split("\x00")
    if pos != len(raw):
        raise FrameError("bytes after the header block's last pair")
    return headers


class HeaderCompressor:
    """One direction's header compression context (kept across frames, sync-flushed)."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                   zdict=HEADER_DICTIONARY)

    def compress(self, headers: Mapping[str, list[str]]) -> bytes:
        raw = encode_header_block(headers)
        return self._z.compress(raw) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The other direction's context; bounded output, the whole block must be consumed."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(zdict=HEADER_DICTIONARY)

    def decompress(self, block: bytes) -> Headers:
        try:
            raw = self._z.decompress(block, MAX_HEADER_BLOCK + 1)
        except zlib.error as e:
            raise FrameError(f"header block does not decompress: {e}") from e
        if len(raw) > MAX_HEADER_BLOCK or self._z.unconsumed_tail:
            raise FrameError(f"header block over {MAX_HEADER_BLOCK} bytes")
        return decode_header_block(raw)


def _control(ftype: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, ftype, (flags << 24) | len(payload)) + payload


def encode_frame(frame: Frame, comp: HeaderCompressor) -> bytes:
    """The frame's bytes; header blocks go through `comp` (so call in wire order)."""
    if isinstance(frame, DataFrame):
        if len(frame.data) > MAX_DATA_LENGTH:
            raise ValueError("data frame over 2^24-1 bytes")
        flags = FLAG_FIN if frame.fin else 0
        return struct.pack(">II", frame.stream_id & 0x7FFFFFFF,
                           (flags << 24) | len(frame.data)) + frame.data
    if isinstance(frame, SynStream):
        payload = struct.pack(">IIBB", frame.stream_id & 0x7FFFFFFF, frame.assoc_id & 0x7FFFFFFF,
                              (frame.priority & 7) << 5, frame.slot)
        return _control(SYN_STREAM, frame.flags, payload + comp.compress(frame.headers))
    if isinstance(frame, SynReply | HeadersFrame):
        ftype = SYN_REPLY if isinstance(frame, SynReply) else HEADERS
        payload = struct.pack(">I", frame.stream_id & 0x7FFFFFFF) + comp.compress(frame.headers)
        return _control(ftype, frame.flags, payload)
    if isinstance(frame, RstStream):
        return _control(RST_STREAM, 0, struct.pack(">II", frame.stream_id, frame.status))
    if isinstance(frame, Settings):
        body = b"".join(struct.pack(">II", (f << 24) | i, v) for f, i, v in frame.entries)
        return _control(SETTINGS, frame.flags, struct.pack(">I", len(frame.entries)) + body)
    if isinstance(frame, Ping):
        return _control(PING, 0, struct.pack(">I", frame.ping_id))
    if isinstance(frame, GoAway):
        return _control(GOAWAY, 0, struct.pack(">II", frame.last_good_id, frame.status))
    if isinstance(frame, WindowUpdate):
        return _control(WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, frame.delta))
    raise TypeError(f"not a SPDY frame: {frame!r}")


def _fixed(ftype: int, payload: bytes, size: int) -> tuple[int, ...]:
    if len(payload) != size:
        raise FrameError(f"control frame type {ftype} with length {len(payload)}, not {size}")
    return struct.unpack(">" + "I" * (size // 4), payload)


def decode_control(ftype: int, flags: int, payload: bytes, dec: HeaderDecompressor) -> Frame:
    if ftype == SYN_STREAM:
        if len(payload) < 10:
            raise FrameError("SYN_STREAM shorter than 10 bytes")
        sid, assoc, prio, slot = struct.unpack(">IIBB", payload[:10])
        return SynStream(_nonzero(sid & 0x7FFFFFFF), dec.decompress(payload[10:]),
                         assoc & 0x7FFFFFFF, prio >> 5, slot, flags)
    if ftype in (SYN_REPLY, HEADERS):
        if len(payload) < 4:
            raise FrameError(f"control frame type {ftype} shorter than 4 bytes")
        sid = _nonzero(struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF)
        headers = dec.decompress(payload[4:])
        if ftype == SYN_REPLY:
            return SynReply(sid, headers, flags)
        return HeadersFrame(sid, headers, flags)
    if ftype == RST_STREAM:
        sid, status = _fixed(ftype, payload, 8)
        return RstStream(sid & 0x7FFFFFFF, status)
    if ftype == SETTINGS:
        if len(payload) < 4:
            raise FrameError("SETTINGS shorter than 4 bytes")
        (n,) = struct.unpack(">I", payload[:4])
        if n > MAX_SETTINGS or len(payload) != 4 + 8 * n:
            raise FrameError(f"SETTINGS with {n} entries in {len(payload)} bytes")
        entries = []
        for k in range(n):
            fid, value = struct.unpack(">II", payload[4 + 8 * k:12 + 8 * k])
            entries.append((fid >> 24, fid & 0xFFFFFF, value))
        return Settings(tuple(entries), flags)
    if ftype == PING:
        return Ping(_fixed(ftype, payload, 4)[0])
    if ftype == GOAWAY:
        last, status = _fixed(ftype, payload, 8)
        return GoAway(last & 0x7FFFFFFF, status)
    if ftype == WINDOW_UPDATE:
        sid, delta = _fixed(ftype, payload, 8)
        return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF)
    raise FrameError(f"unknown control frame type {ftype}")


def _nonzero(sid: int) -> int:
    if sid == 0:
        raise FrameError("stream id 0")
    return sid


class FrameParser:
    """Turns the peer's byte stream into frames; one per connection direction."""

    def __init__(self, max_frame: int = MAX_FRAME_IN) -> None:
        self._buf = bytearray()
        self._dec = HeaderDecompressor()
        self._max = max_frame

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Adds bytes; yields every frame now complete (raises FrameError on bad framing)."""
        self._buf += data
        while len(self._buf) >= 8:
            first, second = struct.unpack(">II", self._buf[:8])
            length = second & 0xFFFFFF
            if length > self._max:
                raise FrameError(f"frame of {length} bytes (at most {self._max})")
            if len(self._buf) < 8 + length:
                return
            payload = bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            flags = second >> 24
            if first & 0x80000000:
                version, ftype = (first >> 16) & 0x7FFF, first & 0xFFFF
                if version != VERSION:
                    raise FrameError(f"SPDY version {version}, not {VERSION}")
                yield decode_control(ftype, flags, payload, self._dec)
            else:
                yield DataFrame(_nonzero(first), payload, bool(flags & FLAG_FIN))
