"""Demonstration pairs: JSONL files and JSON records, with precise errors."""

from __future__ import annotations

import pytest

from icv_vllm.vectors.pairs import DemoPair, PairsError, as_pairs, pairs_from_records, read_pairs_jsonl


def test_reads_pairs_skipping_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"input": "go away", "target": "please leave"}\n'
        "\n   \n"
        '{"target": "thank you \\u2764", "input": "whatever."}\r\n'
    )
    pairs = read_pairs_jsonl(path)
    assert pairs == [DemoPair("go away", "please leave"), DemoPair("whatever.", "thank you \u2764")]
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:4"]


BAD_LINES = {
    "not json": ('{"input": "a", "target": "b"', "not valid JSON"),
    "trailing garbage": ('{"input": "a", "target": "b"} x', "not valid JSON (Extra data at column 31)"),
    "array": ('["a", "b"]', 'expected an object {"input": ..., "target": ...}, got list'),
    "string": ('"a"', "got str"),
    "missing target": ('{"input": "a"}', "missing key 'target'"),
    "missing both": ("{}", "missing key 'input', 'target'"),
    "extra key": ('{"input": "a", "target": "b", "id": 3}', "unexpected key 'id'"),
    "number": ('{"input": 1, "target": "b"}', "'input' must be a string, got int"),
    "null": ('{"input": "a", "target": null}', "'target' must be a string, got NoneType"),
    "empty": ('{"input": "", "target": "b"}', "'input' is empty"),
    "whitespace": ('{"input": "a", "target": " \\t\\n "}', "'target' is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_reported_with_its_number(tmp_path, case):
    line, message = BAD_LINES[case]
    path = tmp_path / "p.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n\n' + line + "\n")
    with pytest.raises(PairsError) as err:
        read_pairs_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_no_pairs(tmp_path, content):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(PairsError, match=f"^{path}: no demonstration pairs"):
        read_pairs_jsonl(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(PairsError, match="cannot read pairs file .*No such file"):
        read_pairs_jsonl(tmp_path / "missing.jsonl")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"input": "\xff\xfe", "target": "b"}\n')
    with pytest.raises(PairsError, match="cannot read pairs file .*utf-8"):
        read_pairs_jsonl(binary)


def test_records():
    assert pairs_from_records([{"input": "a", "target": "b"}]) == [DemoPair("a", "b")]
    with pytest.raises(PairsError, match=r"^pairs\[1\]: missing key 'target'$"):
        pairs_from_records([{"input": "a", "target": "b"}, {"input": "c"}])
    with pytest.raises(PairsError, match=r"^pairs\[0\]: 'input' is empty$"):
        pairs_from_records([{"input": "  ", "target": "b"}])
    with pytest.raises(PairsError, match=r"^body.pairs\[0\]: unexpected key 'x'"):
        pairs_from_records([{"input": "a", "target": "b", "x": 1}], where="body.pairs")
    with pytest.raises(PairsError, match="^pairs: no demonstration pairs$"):
        pairs_from_records([])
    with pytest.raises(PairsError, match="expected a list .* got dict"):
        pairs_from_records({"input": "a", "target": "b"})


def test_as_pairs_accepts_tuples():
    assert as_pairs([("a", "b"), DemoPair("c", "d")]) == [DemoPair("a", "b"), DemoPair("c", "d")]
    with pytest.raises(PairsError, match=r"pairs\[0\]: expected a DemoPair"):
        as_pairs(["ab"])
    with pytest.raises(PairsError, match=r"pairs\[1\]: 'target' must be a string"):
        as_pairs([("a", "b"), ("c", 3)])
    with pytest.raises(PairsError, match="no demonstration pairs"):
        as_pairs([])
