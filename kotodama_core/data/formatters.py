"""How one record of a source becomes one document of text.

plain           record[text]
chat            turns of record[messages], one per line as "role: content" (a turn may be a string,
                prefixed by record[speakers][i] when that field is named)
qa              record[question], a blank line, then record[answer] (a list of answers: each one,
                separated by blank lines; an answer may be a mapping with a `text` key)
code_reasoning  record[problem], a blank line, then record[reasoning] (the trace with its final code)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from kotodama_core.errors import UserError


class FormatError(UserError, ValueError):
    """A record lacks a field its formatter needs, or the field has the wrong type."""


def _field(record: Mapping[str, Any], key: str) -> Any:
    if key not in record or record[key] is None:
        raise FormatError(f"missing field {key!r}")
    return record[key]


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"field {key!r} is {type(value).__name__}, expected a string")
    return value


def plain(record: Mapping[str, Any], f: Mapping[str, str]) -> str:
    return _string(_field(record, f["text"]), f["text"])


def chat(record: Mapping[str, Any], f: Mapping[str, str]) -> str:
    turns = _field(record, f["messages"])
    if not isinstance(turns, list):
        raise FormatError(f"field {f['messages']!r} is {type(turns).__name__}, expected a list of turns")
    speakers = record.get(f["speakers"]) if f["speakers"] else None
    lines = []
    for i, turn in enumerate(turns):
        if isinstance(turn, str):
            who = speakers[i] if isinstance(speakers, list) and i < len(speakers) else None
            lines.append(f"{who}: {turn}" if who else turn)
        elif isinstance(turn, Mapping):
            content = _string(_field(turn, f["content"]), f["content"])
            role = turn.get(f["role"])
            lines.append(f"{role}: {content}" if role else content)
        else:
            raise FormatError(f"turn {i} is {type(turn).__name__}, expected a string or a mapping")
    return "\n".join(lines)


def _answer_text(answer: Any, key: str) -> str:
    if isinstance(answer, Mapping):
        return _string(_field(answer, "text"), f"{key}.text")
    return _string(answer, key)


def qa(record: Mapping[str, Any], f: Mapping[str, str]) -> str:
    question = _string(_field(record, f["question"]), f["question"])
    answer = _field(record, f["answer"])
    answers = answer if isinstance(answer, list) else [answer]
    return "\n\n".join([question, *(_answer_text(a, f["answer"]) for a in answers)])


def code_reasoning(record: Mapping[str, Any], f: Mapping[str, str]) -> str:
    problem = _string(_field(record, f["problem"]), f["problem"])
    reasoning = _string(_field(record, f["reasoning"]), f["reasoning"])
    return f"{problem}\n\n{reasoning}"


FORMATTERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, str]], str]] = {
    "plain": plain, "chat": chat, "qa": qa, "code_reasoning": code_reasoning,
}


def format_record(record: Any, formatter: str, fields: Mapping[str, str]) -> str:
    """The document text of `record`; FormatError when it does not fit the formatter."""
    if not isinstance(record, Mapping):
        raise FormatError(f"record is {type(record).__name__}, expected a JSON object")
    return FORMATTERS[formatter](record, fields)
