"""SPDY/3's zlib preset dictionary for header blocks (SPDY Protocol Draft 3, section 2.6.10.1).

The bytes of `headerDictionary` in github.com/docker/spdystream/spdy/dictionary.go (the
library client-go uses): 1423 bytes, Adler-32 0xE3C6A7C2, the DICTID every compressed header
stream carries in its bytes 3-6. tests/unit/test_spdy_frames.py checks both figures.
"""

from __future__ import annotations

HEADER_DICTIONARY_ADLER32 = 0xE3C6A7C2

HEADER_DICTIONARY = b"".join((
    b"\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00",
    b"\x00\x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-chars",
    b"et\x00\x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\raccept-rang",
    b"es\x00\x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\rauthorization\x00\x00\x00\rcache-",
    b"control\x00\x00\x00\nconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10content-encodi",
    b"ng\x00\x00\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\x00\x10content-l",
    b"ocation\x00\x00\x00\x0bcontent-md5\x00\x00\x00\rcontent-range\x00\x00\x00\x0ccontent-type",
    b"\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00\x07expires\x00",
    b"\x00\x00\x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modified-s",
    b"ince\x00\x00\x00\rif-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmodified-sinc",
    b"e\x00\x00\x00\rlast-modified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-forwards\x00\x00",
    b"\x00\x06pragma\x00\x00\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-authorization\x00",
    b"\x00\x00\x05range\x00\x00\x00\x07referer\x00\x00\x00\x0bretry-after\x00\x00\x00\x06server",
    b"\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00\x00\x11transfer-encoding\x00\x00\x00",
    b"\x07upgrade\x00\x00\x00\nuser-agent\x00\x00\x00\x04vary\x00\x00\x00\x03via\x00\x00\x00",
    b"\x07warning\x00\x00\x00\x10www-authenticate\x00\x00\x00\x06method\x00\x00\x00\x03get\x00",
    b"\x00\x00\x06status\x00\x00\x00\x06200 OK\x00\x00\x00\x07version\x00\x00\x00\x08HTTP/1.1",
    b"\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\nset-cookie\x00\x00\x00\nkeep-alive",
    b"\x00\x00\x00\x06origin1001012012022052063003023033043053063074024054064074084094104114124",
    b"13414415416417502504505203 Non-Authoritative Information204 No Content301 Moved Permanent",
    b"ly400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 N",
    b"ot Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:",
    b"00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/g",
    b"if,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    b"gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
))
