"""The tests' reader of CRI log files keeps a record whole when it holds a lone '\r' (a
console line redrawn by a boot spinner): the integration tests once failed on a record
that Path.read_text's newline translation had cut in two."""

from __future__ import annotations

from pathlib import Path

from tests.integration.vmpods import bad_cri_records, cri_records, log_text

RECORD = "2026-12-01T13:01:05.123456789Z stdout F [  *** ] A start job\r[   23.27] dm: up"


def test_a_lone_carriage_return_stays_inside_its_record(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    log.write_bytes((RECORD + "\n").encode() + b"2026-12-01T13:01:05.2Z stdout P half")
    assert cri_records(log_text(log)) == [RECORD]  # the unfinished record is left for later
    assert bad_cri_records(log_text(log)) == []
    assert log_text(tmp_path / "missing.log") == ""
