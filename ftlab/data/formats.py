"""Record formats and their common forms: the conversation and the document.

Instruction formats (src/tgt, Alpaca, chat messages) become a ``Conversation``: an
optional system text and user/assistant turns; templates and tokenization only ever see
conversations, so a new instruction format needs a converter here and nothing else.
Pretraining-style formats become a ``Document`` (loss on every token; ``ftlab.data.text``
cuts documents into training rows): ``text`` reads ``{"text": ...}`` records and
``autoregressive`` reads PaddleNLP's unsupervised layout, ``{"src": ...}`` with no
``tgt`` (its ``autoregressive=true``). ``format=auto`` detects ``text`` but never
``autoregressive``: a src-only record is as likely an instruction record that lost its
``tgt``, so that format must be named.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ftlab.config.choices import check_choice
from ftlab.data.records import BadRecords, Record
from ftlab.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("src_tgt", "alpaca", "messages", "text", "autoregressive")
TEXT_FORMATS = ("text", "autoregressive")  # documents, not conversations
DETECTABLE = ("src_tgt", "alpaca", "messages", "text")  # what format=auto may pick
DETECT_RECORDS = 20  # records looked at by format=auto

EXPECTED_FIELDS = {
    "src_tgt": "src (string, or list of strings for multi-turn) and tgt (string, or list of "
    "strings of the same length); src[i] is the user turn answered by tgt[i]",
    "alpaca": "instruction (string), output (string) and optional input (string)",
    "messages": "messages (list of {role, content} objects: an optional system message, then "
    "user and assistant messages alternating, ending with an assistant message)",
    "text": "text (a non-empty string: one document)",
    "autoregressive": "src (a non-empty string: one document; PaddleNLP's autoregressive "
    "layout) and no tgt",
}
REQUIRED_KEYS = {
    "src_tgt": ("src", "tgt"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "text": ("text",),
    "autoregressive": ("src",),
}


@dataclass(frozen=True)
class Turn:
    """One user message and the assistant's answer (the training target)."""

    user: str
    assistant: str
    user_input: str = ""  # Alpaca's optional input, kept apart for the alpaca template

    def user_text(self) -> str:
        """The user message as one text (templates without an input slot)."""
        return f"{self.user}\n\n{self.user_input}" if self.user_input else self.user


@dataclass(frozen=True)
class Conversation:
    system: str | None
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Document:
    """One pretraining-style document: every token is a training target."""

    text: str


class RecordProblem(Exception):
    """A record that does not fit its format; turned into a located DataError or a skip."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in record else f"a {type(value).__name__}"
        raise RecordProblem("wrong_fields", f"field {key!r} must be a string, found {found}")
    return value


def _check_target(text: str, field_name: str) -> None:
    if not text.strip():
        raise RecordProblem("empty_target", f"empty target: field {field_name!r} is empty")


def _from_src_tgt(record: dict) -> Conversation:
    src, tgt = record.get("src"), record.get("tgt")
    if isinstance(src, str) and isinstance(tgt, str):
        srcs, tgts = [src], [tgt]
    elif isinstance(src, list) and isinstance(tgt, list):
        if len(src) != len(tgt) or not src:
            raise RecordProblem(
                "wrong_fields",
                f"multi-turn src and tgt must be non-empty lists of equal length, found "
                f"{len(src)} and {len(tgt)}",
            )
        if not all(isinstance(x, str) for x in src + tgt):
            raise RecordProblem("wrong_fields", "multi-turn src and tgt lists must hold strings")
        srcs, tgts = src, tgt
    else:
        found = {
            k: ("missing" if k not in record else type(record[k]).__name__) for k in ("src", "tgt")
        }
        raise RecordProblem(
            "wrong_fields",
            f"src and tgt must both be strings or both lists, "
            f"found src={found['src']}, tgt={found['tgt']}",
        )
    for i, t in enumerate(tgts):
        _check_target(t, "tgt" if len(tgts) == 1 else f"tgt[{i}]")
    return Conversation(None, tuple(Turn(s, t) for s, t in zip(srcs, tgts, strict=True)))


def _from_alpaca(record: dict) -> Conversation:
    instruction, output = _text(record, "instruction"), _text(record, "output")
    user_input = record.get("input", "")
    if user_input is None:
        user_input = ""
    if not isinstance(user_input, str):
        raise RecordProblem(
            "wrong_fields", f"field 'input' must be a string, found a {type(user_input).__name__}"
        )
    _check_target(output, "output")
    return Conversation(None, (Turn(instruction, output, user_input),))


def _from_messages(record: dict) -> Conversation:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordProblem("wrong_fields", "field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise RecordProblem(
                "wrong_fields", f"messages[{i}] must be an object with string role and content"
            )
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    expected = ["user", "assistant"] * (len(messages) // 2)
    if not messages or len(messages) % 2 or roles != expected:
        raise RecordProblem(
            "wrong_fields",
            f"message roles {roles} do not alternate user/assistant after an optional system "
            "message, ending with assistant",
        )
    turns = []
    for i in range(0, len(messages), 2):
        _check_target(messages[i + 1]["content"], f"messages[{i + 1 + (system is not None)}]")
        turns.append(Turn(messages[i]["content"], messages[i + 1]["content"]))
    return Conversation(system, tuple(turns))


def _document(record: dict, key: str) -> Document:
    text = _text(record, key)
    if not text.strip():
        raise RecordProblem("empty_text", f"empty document: field {key!r} is empty")
    return Document(text)


def _from_text(record: dict) -> Document:
    return _document(record, "text")


def _from_autoregressive(record: dict) -> Document:
    if "tgt" in record:
        raise RecordProblem(
            "wrong_fields",
            "an autoregressive record holds its document in src alone; this one also has "
            "tgt (PaddleNLP would drop it). Use data.format=src_tgt for src/tgt pairs",
        )
    return _document(record, "src")


CONVERTERS: dict[str, Callable[[dict], Conversation | Document]] = {
    "src_tgt": _from_src_tgt,
    "alpaca": _from_alpaca,
    "messages": _from_messages,
    "text": _from_text,
    "autoregressive": _from_autoregressive,
}


def _matching_formats(record: dict) -> list[str]:
    return [f for f in DETECTABLE if all(k in record for k in REQUIRED_KEYS[f])]


def _expected_all() -> str:
    return "; ".join(f"{f}: {EXPECTED_FIELDS[f]}" for f in DETECTABLE)


def detect_format(records: Sequence[Record], setting: str) -> str:
    """Resolve ``data.format``: check an explicit one, or detect it from the first records.

    Records that fit no format do not vote; they fail (or are skipped) later with the
    detected format's expected fields, which says more than a list of all formats.
    """
    check_choice("data.format", setting, ("auto", *FORMATS), DataError)
    if setting != "auto":
        return setting
    return vote_format(records, _matching_formats, _expected_all(), kind="", fits="fits a format")


def vote_format(
    records: Sequence[Record],
    matching: Callable[[dict], list[str]],
    expected: str,
    *,
    kind: str,
    fits: str,
) -> str:
    """The one format the first records agree on (SFT formats here, preference formats in
    ``ftlab.data.preference``): a record matching several, no record matching any, or
    records of different formats are errors naming the records. ``kind`` qualifies
    "formats" in the messages ("preference "), ``fits`` says what a matching record is."""
    found: dict[str, str] = {}
    for rec in records[:DETECT_RECORDS]:
        matches = matching(rec.data)
        if len(matches) > 1:
            raise DataError(
                f"{rec.where}: data.format=auto: the record (keys {sorted(rec.data)}) matches "
                f"several {kind}formats ({', '.join(matches)}). Set data.format explicitly."
            )
        if matches:
            found.setdefault(matches[0], rec.where)
    if not found:
        first = records[0] if records else None
        raise DataError(
            f"{first.where if first else 'train split'}: data.format=auto: none of the first "
            f"{min(len(records), DETECT_RECORDS)} records {fits} (the first has keys "
            f"{sorted(first.data) if first else []}). Expected fields: {expected}. Set "
            "data.format explicitly or fix the data."
        )
    if len(found) > 1:
        raise DataError(
            f"data.format=auto: the first records mix {kind}formats "
            f"({', '.join(f'{f} at {w}' for f, w in found.items())}). Use one format per "
            "dataset or set data.format explicitly."
        )
    fmt = next(iter(found))
    log.info(
        "data.format=auto: detected %s from the first %d records",
        fmt,
        min(len(records), DETECT_RECORDS),
    )
    return fmt


def looks_like_preference(data: dict[str, Any]) -> bool:
    """The key sets of the preference formats (``ftlab.data.preference``, which imports
    this module, names and checks them in full)."""
    keys = set(data)
    return any(
        need <= keys
        for need in ({"src", "response"}, {"chosen", "rejected"}, {"prompt", "completion", "label"})
    )


def to_conversation(record: Record, fmt: str, bad: BadRecords) -> Conversation | Document | None:
    """The record as a conversation (or, for text formats, a document); None when it is bad
    and skipped (counted)."""
    try:
        return CONVERTERS[fmt](record.data)
    except RecordProblem as problem:
        other = [f for f in _matching_formats(record.data) if f != fmt]
        if problem.reason in ("empty_target", "empty_text"):
            bad.reject(problem.reason, f"{record.where}: {problem.detail}")
        elif other:
            # The record is fine, the setting is not: skipping would skip every such record.
            message = (
                f"{record.where}: record does not match data.format={fmt} ({problem.detail}); "
                f"its keys {sorted(record.data)} are those of the {other[0]} format. Set "
                f"data.format={other[0]} (or data.format=auto to detect it)"
            )
            if bad.policy == "error":
                raise DataError(message + ".") from None
            bad.reject("other_format", message)
        elif looks_like_preference(record.data):
            # Preference records under an SFT stage: every record would fail the same way.
            raise DataError(
                f"{record.where}: record does not match data.format={fmt}; its keys "
                f"{sorted(record.data)} are those of preference data, which trains with "
                "stage=dpo or stage=kto (e.g. ftlab stage=dpo data.path=DIR; data.format=auto "
                "detects its format)."
            ) from None
        else:
            bad.reject(
                problem.reason,
                f"{record.where}: record does not match data.format={fmt}: {problem.detail}. "
                f"Expected fields: {EXPECTED_FIELDS[fmt]}; the record has keys "
                f"{sorted(record.data)}",
            )
        return None


def record_conversation(record: dict[str, Any], fmt: str) -> Conversation | Document:
    """Convert one raw record (e.g. a dev record for generation); DataError when it is bad."""
    try:
        return CONVERTERS[fmt](record)
    except RecordProblem as problem:
        raise DataError(
            f"record does not match data.format={fmt}: {problem.detail}. "
            f"Expected fields: {EXPECTED_FIELDS[fmt]}"
        ) from None
