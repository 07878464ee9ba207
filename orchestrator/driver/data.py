"""Calibration data: a text file or JSONL, tokenized with the model's tokenizer when it has one.

Batches are plain lists of token ids (cheap to ship through Ray) with stable ids, so a resumed or
retried run can tell which batches are done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import CalibrationDataError


@dataclass(frozen=True)
class Batch:
    """One calibration batch: ``tokens`` is [batch][seq] token ids; ``batch_id`` is stable."""

    batch_id: int
    tokens: tuple[tuple[int, ...], ...]


def read_texts(path: str | Path) -> list[str]:
    """Texts of a ``.jsonl`` file (field ``text``) or a plain text file (one sample per paragraph)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationDataError(f"calibration data {p} does not exist; pass a .txt or .jsonl file")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationDataError(f"{p}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationDataError(f'{p}:{lineno}: each JSONL line needs a string field "text"')
            texts.append(record["text"])
    else:
        texts = [t.strip() for t in raw.split("\n\n") if t.strip()]
    if not texts:
        raise CalibrationDataError(f"calibration data {p} holds no text")
    return texts


def byte_tokenize(text: str, vocab_size: int) -> list[int]:
    """Fallback for models shipped without a tokenizer: UTF-8 bytes folded into the vocabulary."""
    return [b % vocab_size for b in text.encode("utf-8")]


def make_batches(token_streams: list[list[int]], seq_len: int, batch_size: int, max_batches: int | None = None) -> list[Batch]:
    """Cut the concatenated token streams into [batch_size, seq_len] batches (the tail is dropped)."""
    flat = [t for stream in token_streams for t in stream]
    rows = [tuple(flat[i : i + seq_len]) for i in range(0, len(flat) - seq_len + 1, seq_len)]
    batches = [
        Batch(i // batch_size, tuple(rows[i : i + batch_size]))
        for i in range(0, len(rows) - batch_size + 1, batch_size)
    ]
    if not batches:
        raise CalibrationDataError(
            f"calibration data too short: {len(flat)} tokens make no [{batch_size} x {seq_len}] batch; "
            "give more text or lower --seq-len/--batch-size"
        )
    return batches[:max_batches] if max_batches else batches


def tokenize_texts(texts: list[str], model_dir: str | Path | None, vocab_size: int) -> list[list[int]]:
    """Token ids with the tokenizer saved beside the model, else the byte fallback."""
    tokenizer = _load_tokenizer(model_dir) if model_dir else None
    if tokenizer is None:
        return [byte_tokenize(t, vocab_size) for t in texts]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    return [[i % vocab_size for i in row] for row in ids]


def _load_tokenizer(model_dir: str | Path):  # type: ignore[no-untyped-def]
    d = Path(model_dir)
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
