"""Chat templates: how a conversation becomes text pieces, each marked target or not.

``data.chat_template``:
  - null: plain concatenation, ``[bos] + enc(src) + enc(tgt) + [eos]`` per turn (bos once);
    every text is its own piece, encoded without special tokens (PaddleNLP's llm/ recipe).
  - ``tokenizer``: the tokenizer's own (jinja) chat template, rendered turn by turn.
  - a name from ``NAMED_TEMPLATES`` (``chatml``/``qwen2``, ``llama3``, ``alpaca``).

With a template, all prompt text before an answer is one piece (encoded as one string, as
at inference), and the answer plus the template's end-of-turn marker is the target piece.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ftlab.data.formats import Conversation
from ftlab.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    text: str
    target: bool


class Renderer(Protocol):
    name: str
    add_bos: bool  # prepend the bos (encoder.leading_ids: ChatGLM2's [gMASK] sop)
    eos_after_target: bool  # append tokenizer.eos_token_id to every answer

    def pieces(self, conv: Conversation) -> list[Piece]: ...


@dataclass(frozen=True)
class PlainRenderer:
    name: str = "null"
    add_bos: bool = True
    eos_after_target: bool = True

    def pieces(self, conv: Conversation) -> list[Piece]:
        out = [Piece(conv.system, False)] if conv.system else []
        for turn in conv.turns:
            out += [Piece(turn.user_text(), False), Piece(turn.assistant, True)]
        return out


@dataclass(frozen=True)
class NamedTemplate:
    """A small template written out in ftlab: role blocks around the message text."""

    name: str
    add_bos: bool
    system: str  # "{content}" is the system text
    user: str  # "{content}" is the user text
    assistant_prefix: str  # prompt text that opens the answer
    assistant_end: str  # end-of-turn marker, part of the target ("" -> eos_after_target)
    after_answer: str  # prompt text between an answer and the next user block
    default_system: str | None = None
    user_input: str | None = None  # "{input}" block for Alpaca's input field

    @property
    def eos_after_target(self) -> bool:
        return not self.assistant_end

    def _user_block(self, turn: Any) -> str:
        if self.user_input is None:
            return self.user.format(content=turn.user_text())
        block = self.user.format(content=turn.user)
        return block + (self.user_input.format(input=turn.user_input) if turn.user_input else "")

    def pieces(self, conv: Conversation) -> list[Piece]:
        system = conv.system if conv.system is not None else self.default_system
        prompt = self.system.format(content=system) if system else ""
        out: list[Piece] = []
        for i, turn in enumerate(conv.turns):
            if i:
                prompt = self.after_answer
            prompt += self._user_block(turn) + self.assistant_prefix
            out += [Piece(prompt, False), Piece(turn.assistant + self.assistant_end, True)]
        return out

    def markers(self) -> list[str]:
        """Special-looking strings a matching tokenizer should know as single tokens."""
        text = self.system + self.user + self.assistant_prefix + self.assistant_end
        return sorted({m for m in _angle_markers(text)})


def _angle_markers(text: str) -> list[str]:
    out, start = [], text.find("<|")
    while start != -1:
        end = text.find("|>", start)
        if end == -1:
            break
        out.append(text[start : end + 2])
        start = text.find("<|", end)
    return out


_CHATML = NamedTemplate(
    name="chatml",
    add_bos=False,
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    after_answer="\n",
)
NAMED_TEMPLATES: dict[str, NamedTemplate] = {
    "chatml": _CHATML,
    "qwen2": _CHATML,
    "llama3": NamedTemplate(
        name="llama3",
        add_bos=True,
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>",
        after_answer="",
    ),
    "alpaca": NamedTemplate(
        name="alpaca",
        add_bos=True,
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        user_input="### Input:\n{input}\n\n",
        assistant_prefix="### Response:\n",
        assistant_end="",
        after_answer="\n\n",
        default_system="Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.",
    ),
}


class TokenizerTemplate:
    """The tokenizer's jinja chat template, rendered incrementally to find each answer.

    Prompt i is ``render(messages[:2i+1], add_generation_prompt=True)`` minus what came
    before; answer i is ``render(messages[:2i+2])`` minus prompt i. A template whose
    renderings are not prefixes of each other cannot be split this way and is refused.
    """

    name = "tokenizer"
    add_bos = False  # jinja templates write the bos token themselves
    eos_after_target = False  # ... and their own end-of-turn marker

    def __init__(self, tokenizer: Any) -> None:
        template = getattr(tokenizer, "chat_template", None)
        if template is None or not hasattr(template, "render"):
            kind = "no chat template" if template is None else "a non-jinja chat template"
            raise DataError(
                f"data.chat_template=tokenizer, but the tokenizer ({type(tokenizer).__name__}) "
                f"has {kind}. Use a named template ({', '.join(sorted(NAMED_TEMPLATES))}) "
                "or null for plain concatenation."
            )
        self.template = template
        self.context = dict(getattr(tokenizer, "special_tokens_map", {}) or {})

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=generation_prompt, **self.context
            )
        except Exception as err:  # noqa: BLE001 - jinja raises many types; report as data
            raise DataError(
                f"data.chat_template=tokenizer: the tokenizer's template failed on "
                f"{len(messages)} messages: {type(err).__name__}: {err}"
            ) from err

    def pieces(self, conv: Conversation) -> list[Piece]:
        messages = [{"role": "system", "content": conv.system}] if conv.system else []
        out: list[Piece] = []
        done = ""
        for turn in conv.turns:
            messages.append({"role": "user", "content": turn.user_text()})
            prompt = self._render(messages, True)
            messages.append({"role": "assistant", "content": turn.assistant})
            full = self._render(messages, False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(
                    "data.chat_template=tokenizer: the tokenizer's template does not render "
                    "conversations as growing prefixes, so answers cannot be located. Use a "
                    f"named template ({', '.join(sorted(NAMED_TEMPLATES))})."
                )
            out += [Piece(prompt[len(done) :], False), Piece(full[len(prompt) :], True)]
            done = full
        return out


def make_renderer(setting: str | None, tokenizer: Any) -> Renderer:
    """The renderer for ``data.chat_template``."""
    if setting is None or setting in ("null", "none"):
        return PlainRenderer()
    if setting == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if setting not in NAMED_TEMPLATES:
        raise DataError(
            f"data.chat_template={setting!r} is unknown. Use null (plain concatenation), "
            f"tokenizer (the tokenizer's own template) or one of: "
            f"{', '.join(sorted(NAMED_TEMPLATES))}."
        )
    template = NAMED_TEMPLATES[setting]
    unknown = [m for m in template.markers() if _single_token_id(tokenizer, m) is None]
    if unknown:
        log.warning(
            "chat template %s: %s are not tokens of this tokenizer; they are encoded as plain text",
            setting,
            ", ".join(unknown),
        )
    return template


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    return None if token_id is None or (unk is not None and token_id == unk) else token_id
