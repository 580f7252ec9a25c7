"""Question answering records: reading SQuAD-format json or JSONL, and the source text a
sequence-to-sequence model reads (T5's "question: ... context: ..." layout)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmcli.errors import UserError
from llmcli.io import iter_lines, read_text


@dataclass(frozen=True)
class QARecord:
    question: str
    context: str
    answers: list[str] = field(default_factory=list)
    id: str | None = None


def qa_source(question: str, context: str) -> str:
    # Question first, so truncating an over-long context never cuts the question.
    return f"question: {question} context: {context}"


def _record(obj: object, where: str) -> QARecord:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with question and context")
    for key in ("question", "context"):
        if not isinstance(obj.get(key), str):
            raise UserError(f"{where}: missing string field {key!r}")
    answers = obj.get("answers", obj.get("answer", []))
    if isinstance(answers, dict):  # HF datasets layout: {"text": [...], "answer_start": [...]}
        answers = answers.get("text", [])
    if isinstance(answers, str):
        answers = [answers]
    answers = [a["text"] if isinstance(a, dict) else a for a in answers]
    if not all(isinstance(a, str) for a in answers):
        raise UserError(f"{where}: answers must be strings or objects with a text field")
    return QARecord(obj["question"], obj["context"], answers, obj.get("id"))


def read_squad_json(data: dict, source: str) -> list[QARecord]:
    records = []
    for article in data.get("data", []):
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [a.get("text", "") for a in qa.get("answers", [])]
                records.append(QARecord(qa.get("question", ""), paragraph.get("context", ""), answers, qa.get("id")))
    if not records:
        raise UserError(f"{source}: no questions found in this SQuAD-format file")
    return records


def read_qa_records(path: str | Path | None) -> list[QARecord]:
    """SQuAD json (a file whose JSON has a top-level "data" list) or JSONL, one object per line."""
    name = "<stdin>" if path in (None, "-") else str(path)
    if path not in (None, "-") and str(path).endswith(".json"):
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise UserError(f"{name}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and "data" in data:
            return read_squad_json(data, name)
        raise UserError(f"{name}: expected SQuAD format (a top-level 'data' list); use .jsonl for one object per line")
    records = []
    for number, line in enumerate(iter_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{number}: not valid JSON ({e.msg})") from None
        records.append(_record(obj, f"{name}:{number}"))
    return records
