"""Reading chat records: a line that is not UTF-8 is that line's fault (file, line, byte), not a crash."""

from __future__ import annotations

from fusemerge.lm.chat import BadRecord, read_records


def test_a_non_utf8_line_is_a_bad_record_naming_its_byte(tmp_path):
    first = b'{"messages": []}\n'
    bad = b'{"a": "caf\xe9"}\n'
    path = tmp_path / "d.jsonl"
    path.write_bytes(first + bad + b'{"b": 1}\n')
    records = list(read_records(path))
    assert [n for n, _ in records] == [1, 2, 3]
    assert isinstance(records[1][1], BadRecord)
    offset = len(first) + bad.index(b"\xe9")
    assert f"byte 0xe9 at byte {offset} of the file" in str(records[1][1])
    assert records[2][1] == {"b": 1}
