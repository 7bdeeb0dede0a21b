"""Preference record formats: pairs (chosen vs rejected) and labelled completions (KTO).

Every format becomes a ``PreferencePair`` or a ``LabelledCompletion``: a ``Prompt`` (an
optional system text, earlier turns, and the user message being answered) plus the
response texts. Templates and tokenization (``ftlab.data.preference_examples``) only see
these, as SFT's only see conversations.

Formats (``data.format``; ``auto`` detects one from the first records, as for SFT):

* ``src_response``: PaddleNLP's preference form (``llm/alignment/dpo``): ``src`` (string,
  or list of user turns), ``tgt`` (earlier answers: one fewer than ``src``; ``[]`` or
  absent for one turn), ``response`` (two answers) and ``sort`` (their ranks: the higher
  is chosen). With one response and ``sort`` 1 or 0 it is PaddleNLP's KTO form
  (desirable / undesirable).
* ``prompt_chosen_rejected``: ``prompt`` (string, or messages ending with a user message),
  ``chosen`` and ``rejected`` (strings, or one assistant message each).
* ``chosen_rejected``: ``chosen`` and ``rejected`` as whole conversations (message lists)
  that share everything but the last assistant message, which is the answer compared.
* ``prompt_completion_label``: ``prompt``, ``completion`` and ``label`` (true: desirable).

A bad record names ``file:line`` and what is wrong (a missing or empty response, chosen
equal to rejected, an empty prompt, ...); ``data.on_bad_record=skip`` skips and counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ftlab.config.choices import check_choice
from ftlab.data.formats import Conversation, RecordProblem, Turn, vote_format
from ftlab.data.records import BadRecords, Record
from ftlab.errors import DataError

log = logging.getLogger(__name__)

PAIRWISE = "pairwise"  # chosen vs rejected (DPO and its variants)
LABELLED = "labelled"  # one completion marked desirable or not (KTO)

PREFERENCE_FORMATS = (
    "src_response",
    "prompt_chosen_rejected",
    "chosen_rejected",
    "prompt_completion_label",
)
DETECT_RECORDS = 20

EXPECTED_FIELDS = {
    "src_response": "src (string, or list of user turns), optional tgt (the earlier answers, "
    "one fewer than src), response (a list of 2 answers, or 1 for KTO) and sort (their ranks, "
    "same length: the higher rank is chosen; for one response 1 = desirable, 0 = undesirable)",
    "prompt_chosen_rejected": "prompt (string, or a list of {role, content} messages ending "
    "with a user message), chosen and rejected (strings, or a list with one assistant message)",
    "chosen_rejected": "chosen and rejected (lists of {role, content} messages that are equal "
    "up to a last assistant message, the answers compared)",
    "prompt_completion_label": "prompt (string or messages), completion (string or one "
    "assistant message) and label (true for a desirable completion, false otherwise)",
}


@dataclass(frozen=True)
class Prompt:
    """What the responses answer: optional system text, earlier turns, the user message."""

    system: str | None
    history: tuple[Turn, ...]
    user: str

    def answered_by(self, answer: str) -> Conversation:
        """The conversation in which ``answer`` is the last assistant message."""
        return Conversation(self.system, (*self.history, Turn(self.user, answer)))


@dataclass(frozen=True)
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str


@dataclass(frozen=True)
class LabelledCompletion:
    prompt: Prompt
    completion: str
    desirable: bool


Parsed = PreferencePair | LabelledCompletion


# --------------------------------------------------------------------------- fields


def _type_name(record: dict, key: str) -> str:
    return "missing" if key not in record else f"a {type(record[key]).__name__}"


def _response(value: Any, key: str) -> str:
    """A response given as a string or as a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
            raise RecordProblem(
                "wrong_fields", f"field {key!r} must hold one assistant message with content"
            )
        value = message["content"]
    if not isinstance(value, str):
        raise RecordProblem(
            "wrong_fields",
            f"field {key!r} must be a string or one assistant message, found a "
            f"{type(value).__name__}",
        )
    if not value.strip():
        raise RecordProblem("empty_response", f"empty response: field {key!r} is empty")
    return value


def _check_messages(messages: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RecordProblem("wrong_fields", f"field {key!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise RecordProblem(
                "wrong_fields", f"{key}[{i}] must be an object with string role and content"
            )
    return messages


def _prompt_from_messages(messages: list[dict[str, str]], key: str) -> Prompt:
    """System?, then user/assistant turns, ending with the user message being answered."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"]
    if roles != expected:
        raise RecordProblem(
            "wrong_fields",
            f"{key} roles {roles} do not alternate user/assistant after an optional system "
            "message, ending with the user message the responses answer",
        )
    history = tuple(
        Turn(messages[i]["content"], messages[i + 1]["content"])
        for i in range(0, len(messages) - 1, 2)
    )
    return _checked(Prompt(system, history, messages[-1]["content"]))


def _prompt(value: Any, key: str = "prompt") -> Prompt:
    if isinstance(value, str):
        return _checked(Prompt(None, (), value))
    if isinstance(value, list):
        return _prompt_from_messages(_check_messages(value, key), key)
    found = "missing" if value is None else f"a {type(value).__name__}"
    raise RecordProblem(
        "wrong_fields", f"field {key!r} must be a string or a list of messages, found {found}"
    )


def _checked(prompt: Prompt) -> Prompt:
    if not prompt.user.strip():
        raise RecordProblem("empty_prompt", "empty prompt: the user message answered is empty")
    return prompt


def _pair(prompt: Prompt, chosen: str, rejected: str) -> PreferencePair:
    if chosen.strip() == rejected.strip():
        raise RecordProblem(
            "equal_responses",
            "chosen and rejected are the same text: the pair states no preference",
        )
    return PreferencePair(prompt, chosen, rejected)


# --------------------------------------------------------------------------- formats


def _strings(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return list(value)
    raise RecordProblem(
        "wrong_fields",
        f"field {key!r} must be a string or a list of strings, found a {type(value).__name__}",
    )


def _from_src_response(record: dict) -> Parsed:
    if "src" not in record:
        raise RecordProblem("wrong_fields", "field 'src' is missing")
    srcs = _strings(record["src"], "src")
    tgts = _strings(record.get("tgt", []), "tgt")
    if not srcs or len(srcs) != len(tgts) + 1:
        raise RecordProblem(
            "wrong_fields",
            f"src holds {len(srcs)} user turns and tgt {len(tgts)} answers: tgt must hold "
            "exactly one fewer (the answers before the last user turn)",
        )
    responses, sort = record.get("response"), record.get("sort")
    if not isinstance(responses, list) or len(responses) not in (1, 2):
        found = len(responses) if isinstance(responses, list) else _type_name(record, "response")
        raise RecordProblem(
            "wrong_fields",
            f"field 'response' must be a list of 2 answers (or 1 for KTO), found {found}",
        )
    if (
        not isinstance(sort, list)
        or len(sort) != len(responses)
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sort)
    ):
        raise RecordProblem(
            "wrong_fields",
            f"field 'sort' must be a list of {len(responses)} numbers (one rank per response), "
            f"found {sort!r}",
        )
    texts = [_response(r, f"response[{i}]") for i, r in enumerate(responses)]
    prompt = _checked(
        Prompt(None, tuple(Turn(s, t) for s, t in zip(srcs, tgts, strict=False)), srcs[-1])
    )
    if len(texts) == 1:
        if sort[0] not in (0, 1):
            raise RecordProblem(
                "wrong_fields",
                f"one response with sort {sort!r}: a labelled (KTO) record has sort [1] "
                "(desirable) or [0] (undesirable)",
            )
        return LabelledCompletion(prompt, texts[0], bool(sort[0]))
    if sort[0] == sort[1]:
        raise RecordProblem(
            "equal_ranks", f"sort {sort!r} ranks both responses equally: no preference"
        )
    chosen, rejected = (texts[0], texts[1]) if sort[0] > sort[1] else (texts[1], texts[0])
    return _pair(prompt, chosen, rejected)


def _from_prompt_chosen_rejected(record: dict) -> Parsed:
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordProblem("wrong_fields", f"field {key!r} is missing")
    prompt = _prompt(record.get("prompt"))
    return _pair(
        prompt, _response(record["chosen"], "chosen"), _response(record["rejected"], "rejected")
    )


def _from_chosen_rejected(record: dict) -> Parsed:
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordProblem("wrong_fields", f"field {key!r} is missing")
    chosen = _check_messages(record["chosen"], "chosen")
    rejected = _check_messages(record["rejected"], "rejected")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RecordProblem(
                "wrong_fields", f"{key} must end with the assistant message being compared"
            )
    if chosen[:-1] != rejected[:-1]:
        raise RecordProblem(
            "wrong_fields",
            "chosen and rejected differ before their last message: they must be the same "
            "conversation up to the answers compared",
        )
    if len(chosen) < 2:
        raise RecordProblem("empty_prompt", "empty prompt: no user message before the answers")
    prompt = _prompt_from_messages(chosen[:-1], "chosen")
    return _pair(
        prompt,
        _response(chosen[-1]["content"], "chosen"),
        _response(rejected[-1]["content"], "rejected"),
    )


def _from_prompt_completion_label(record: dict) -> Parsed:
    for key in ("completion", "label"):
        if key not in record:
            raise RecordProblem("wrong_fields", f"field {key!r} is missing")
    label = record["label"]
    if not isinstance(label, bool):
        raise RecordProblem(
            "wrong_fields",
            f"field 'label' must be true (desirable) or false (undesirable), found {label!r}",
        )
    prompt = _prompt(record.get("prompt"))
    return LabelledCompletion(prompt, _response(record["completion"], "completion"), label)


CONVERTERS: dict[str, Callable[[dict], Parsed]] = {
    "src_response": _from_src_response,
    "prompt_chosen_rejected": _from_prompt_chosen_rejected,
    "chosen_rejected": _from_chosen_rejected,
    "prompt_completion_label": _from_prompt_completion_label,
}


def _matches(fmt: str, record: dict) -> bool:
    keys = set(record)
    if fmt == "src_response":
        return {"src", "response"} <= keys
    if fmt == "prompt_chosen_rejected":
        return {"prompt", "chosen", "rejected"} <= keys
    if fmt == "chosen_rejected":
        return {"chosen", "rejected"} <= keys and "prompt" not in keys
    return {"prompt", "completion", "label"} <= keys


def detect_preference_format(records: Sequence[Record], setting: str) -> str:
    """Resolve ``data.format`` for preference data: check it, or detect it from the first
    records (the same rules as SFT's ``detect_format``: ambiguity and mixing are errors)."""
    check_choice("data.format", setting, ("auto", *PREFERENCE_FORMATS), DataError)
    if setting != "auto":
        return setting
    expected = "; ".join(f"{f}: {EXPECTED_FIELDS[f]}" for f in PREFERENCE_FORMATS)
    return vote_format(
        records,
        lambda data: [f for f in PREFERENCE_FORMATS if _matches(f, data)],
        expected,
        kind="preference ",
        fits="is a preference record",
    )


def parse_preference(record: Record, fmt: str, bad: BadRecords) -> Parsed | None:
    """The record as a pair or a labelled completion; None when bad and skipped (counted)."""
    try:
        return CONVERTERS[fmt](record.data)
    except RecordProblem as problem:
        if problem.reason == "wrong_fields":
            bad.reject(
                problem.reason,
                f"{record.where}: record does not match data.format={fmt}: {problem.detail}. "
                f"Expected fields: {EXPECTED_FIELDS[fmt]}; the record has keys "
                f"{sorted(record.data)}",
            )
        else:
            bad.reject(problem.reason, f"{record.where}: {problem.detail}")
        return None
