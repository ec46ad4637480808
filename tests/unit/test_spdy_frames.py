"""SPDY/3.1 framing (runtime/streaming/spdy_frames.py) against frames captured from
github.com/docker/spdystream's Framer (tests/go/spdyclient `capture`, kept in
tests/unit/golden/spdy_spdystream_frames.hex), and the preset dictionary's figures."""

from __future__ import annotations

import contextlib
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arktos_vm_runtime.streaming import spdy_frames as sf
from arktos_vm_runtime.streaming.spdy_dictionary import (
    HEADER_DICTIONARY,
    HEADER_DICTIONARY_ADLER32,
)

GOLDEN = Path(__file__).parent / "golden" / "spdy_spdystream_frames.hex"


def captured() -> list[bytes]:
    return [bytes.fromhex(line) for line in GOLDEN.read_text().split()]


def test_dictionary_figures() -> None:
    assert len(HEADER_DICTIONARY) == 1423
    assert zlib.adler32(HEADER_DICTIONARY) == HEADER_DICTIONARY_ADLER32 == 0xE3C6A7C2
    assert HEADER_DICTIONARY.startswith(b"\x00\x00\x00\x07options")
    assert HEADER_DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")


def test_captured_frames_parse_in_one_context() -> None:
    """All of spdystream's frames through one parser: the header blocks share one zlib
    context, as on a connection."""
    parser = sf.FrameParser()
    frames = list(parser.feed(b"".join(captured())))
    assert frames == [
        sf.SynStream(1, {"streamtype": ["error"]}),
        sf.SynStream(3, {"streamtype": ["data"], "port": ["8080"], "requestid": ["0"]}),
        sf.SynStream(5, {"multi": ["a", "b"]}, assoc_id=1, priority=7, flags=sf.FLAG_FIN),
        sf.SynReply(1, {}),
        sf.HeadersFrame(3, {"streamtype": ["error"]}),
        sf.DataFrame(1, b"hello"),
        sf.DataFrame(3, b"", fin=True),
        sf.RstStream(5, sf.RST_CANCEL),
        sf.Settings(((0, sf.SETTINGS_INITIAL_WINDOW_SIZE, 65536),)),
        sf.Ping(1),
        sf.GoAway(5, sf.GOAWAY_OK),
        sf.WindowUpdate(3, 1000),
    ]


def test_captured_frames_byte_by_byte() -> None:
    """A frame split anywhere arrives whole, once."""
    parser = sf.FrameParser()
    out = []
    for b in b"".join(captured()):
        out.extend(parser.feed(bytes([b])))
    assert len(out) == 12
    assert out[1] == sf.SynStream(3, {"streamtype": ["data"], "port": ["8080"],
                                      "requestid": ["0"]})


def test_compressed_header_carries_dictid() -> None:
    syn = captured()[0]
    block = syn[18:]
    assert block[0] & 0x0F == 8 and block[1] & 0x20  # deflate, FDICT
    assert struct.unpack(">I", block[2:6])[0] == 0xE3C6A7C2
    ours = sf.encode_frame(sf.SynReply(1, {}), sf.HeaderCompressor())
    assert struct.unpack(">I", ours[14:18])[0] == 0xE3C6A7C2
    assert ours.endswith(b"\x00\x00\xff\xff")  # sync flush inside the frame


@pytest.mark.parametrize("index", [5, 6, 7, 8, 9, 10, 11])
def test_uncompressed_frames_encode_exactly_as_spdystream(index: int) -> None:
    parser = sf.FrameParser()
    frames = list(parser.feed(b"".join(captured())))
    assert sf.encode_frame(frames[index], sf.HeaderCompressor()) == captured()[index]


def test_our_header_frames_round_trip_in_one_context() -> None:
    comp, parser = sf.HeaderCompressor(), sf.FrameParser()
    sent: list[sf.Frame] = [
        sf.SynStream(1, {"streamtype": ["error"]}),
        sf.SynReply(1, {}),
        sf.SynStream(3, {"streamtype": ["stdout"], "x": ["a", "b"]}, priority=3),
        sf.HeadersFrame(3, {"k": ["v"]}, flags=sf.FLAG_FIN),
    ]
    wire = b"".join(sf.encode_frame(f, comp) for f in sent)
    assert list(parser.feed(wire)) == sent


def test_header_context_is_shared() -> None:
    """The second block of a context is shorter than alone: the decoder must keep state, and
    a fresh decoder cannot read it."""
    comp = sf.HeaderCompressor()
    h = {"streamtype": ["stdout"], "port": ["12345"]}
    first = sf.encode_frame(sf.SynStream(1, h), comp)
    second = sf.encode_frame(sf.SynStream(3, h), comp)
    assert len(second) < len(first)
    with pytest.raises(sf.FrameError):
        list(sf.FrameParser().feed(second))


@pytest.mark.parametrize("wire,match", [
    (struct.pack(">HHI", 0x8002, 6, 4) + b"\0\0\0\1", "version 2"),
    (struct.pack(">HHI", 0x8003, 5, 0), "unknown control frame type 5"),
    (struct.pack(">HHI", 0x8003, 6, 3) + b"\0\0\0", "length 3"),
    (struct.pack(">HHI", 0x8003, 3, 4) + b"\0\0\0\1", "length 4"),
    (struct.pack(">II", 0, 1) + b"x", "stream id 0"),
    (struct.pack(">HHI", 0x8003, 1, 14) + b"\0\0\0\1\0\0\0\0\0\0garb", "decompress"),
    (struct.pack(">II", 1, 2 * 1024 * 1024), "at most"),
    (struct.pack(">HHI", 0x8003, 4, 8) + struct.pack(">II", 2, 0), "SETTINGS with 2"),
])
def test_bad_frames_are_errors(wire: bytes, match: str) -> None:
    with pytest.raises(sf.FrameError, match=match):
        list(sf.FrameParser().feed(wire))


def test_header_block_checks() -> None:
    good = sf.encode_header_block({"a": ["1"]})
    assert sf.decode_header_block(good) == {"a": ["1"]}
    with pytest.raises(sf.FrameError, match="truncated"):
        sf.decode_header_block(good[:-1])
    with pytest.raises(sf.FrameError, match="after"):
        sf.decode_header_block(good + b"x")
    upper = struct.pack(">II", 1, 1) + b"A" + struct.pack(">I", 0)
    with pytest.raises(sf.FrameError, match="lowercase"):
        sf.decode_header_block(upper)
    dup = struct.pack(">I", 2) + (struct.pack(">I", 1) + b"a" + struct.pack(">I", 0)) * 2
    with pytest.raises(sf.FrameError, match="repeated"):
        sf.decode_header_block(dup)
    many = struct.pack(">I", 10_000)
    with pytest.raises(sf.FrameError, match="pairs"):
        sf.decode_header_block(many)


def test_header_bomb_is_bounded() -> None:
    """A block that inflates past MAX_HEADER_BLOCK is refused, not buffered."""
    raw = sf.encode_header_block({"a": ["x" * (sf.MAX_HEADER_BLOCK * 4)]})
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                         zdict=HEADER_DICTIONARY)
    block = z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)
    assert len(block) < 4096
    wire = struct.pack(">HHI", 0x8003, 2, 4 + len(block)) + b"\0\0\0\1" + block
    with pytest.raises(sf.FrameError, match="over"):
        list(sf.FrameParser().feed(wire))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_arbitrary_bytes_are_frames_or_frame_errors(data: bytes, split: int) -> None:
    """Whatever a client sends, the parser yields frames or raises FrameError, nothing else;
    with a valid SYN_STREAM first, so the header decompressor is exercised too."""
    prefix = captured()[0]
    parser = sf.FrameParser()
    try:
        for pos in range(0, len(prefix + data), split):
            list(parser.feed((prefix + data)[pos:pos + split]))
    except sf.FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                min_size=1, max_size=6))
def test_corrupted_captured_frames_are_frames_or_frame_errors(
        flips: list[tuple[int, int]]) -> None:
    wire = bytearray(b"".join(captured()))
    for pos, value in flips:
        wire[pos % len(wire)] = value
    with contextlib.suppress(sf.FrameError):
        list(sf.FrameParser().feed(bytes(wire)))
