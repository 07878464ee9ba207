"""Calibration data loading: text and JSONL, tokenizer fallback, batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.driver.data import byte_tokenize, make_batches, read_texts, tokenize_texts
from orchestrator.errors import CalibrationDataError


def test_text_file_splits_on_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("one two\nthree\n\n\nfour\n")
    assert read_texts(p) == ["one two\nthree", "four"]


def test_jsonl_reads_text_field(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b", "id": 3}\n')
    assert read_texts(p) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "match"),
    [("{not json}\n", r"c\.jsonl:1: not valid JSON"), ('{"body": "x"}\n', r'c\.jsonl:1: .*"text"'), ("", "holds no text")],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(content)
    with pytest.raises(CalibrationDataError, match=match):
        read_texts(p)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match=r"nope\.txt does not exist"):
        read_texts(tmp_path / "nope.txt")


def test_byte_fallback_folds_into_vocab() -> None:
    assert byte_tokenize("AB\u00e9", 64) == [65 % 64, 66 % 64, 0xC3 % 64, 0xA9 % 64]
    assert tokenize_texts(["AB"], None, 256) == [[65, 66]]


def test_batches_are_cut_in_order_with_stable_ids() -> None:
    batches = make_batches([list(range(10)), list(range(10, 23))], seq_len=4, batch_size=2)
    assert [b.batch_id for b in batches] == [0, 1]
    assert batches[0].tokens == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert batches[1].tokens == ((8, 9, 10, 11), (12, 13, 14, 15))
    assert make_batches([list(range(40))], 4, 2, max_batches=1)[0].batch_id == 0


def test_too_short_data_says_what_to_change() -> None:
    with pytest.raises(CalibrationDataError, match="--seq-len"):
        make_batches([[1, 2, 3]], seq_len=8, batch_size=1)
