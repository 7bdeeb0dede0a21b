"""Tokenizer files between Hugging Face's layout and PaddleNLP's.

In: a Hugging Face directory's tokenizer is copied into the converted cache entry so that
PaddleNLP's ``AutoTokenizer`` builds the tokenizer transformers' ``AutoTokenizer`` builds
for the same directory (the token ids ftlab trains on must be the ones a transformers user
gets): ``tokenizer.json`` present -> the fast class (transformers' default; both run the
same ``tokenizers`` library on the same file), else the slow sentencepiece / BPE class.
PaddleNLP's Llama tokenizer reads its sentencepiece model as ``sentencepiece.bpe.model``
(transformers writes ``tokenizer.model``), and transformers >= 4.43 keeps the chat template
in ``chat_template.jinja``, which PaddleNLP does not read: it goes into
``tokenizer_config.json``'s ``chat_template``.

Out: the inverse for ``ftlab-merge --format hf`` (``tokenizer.model``, the chat template the
run trained with in ``tokenizer_config.json`` and ``chat_template.jinja``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftlab.data.templates import NAMED_TEMPLATES

SPM_HF = "tokenizer.model"
SPM_PADDLE = "sentencepiece.bpe.model"
FAST_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Copied as they are, both ways.
PLAIN_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "qwen.tiktoken",  # Qwen (v1): tiktoken ranks, read by PaddleNLP's QWenTokenizer too
)


def tokenizer_files(directory: Path) -> list[Path]:
    names = (*PLAIN_FILES, SPM_HF, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE)
    return [directory / n for n in names if (directory / n).is_file()]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def stage_for_paddlenlp(
    src: Path, dst: Path, family_values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Copy ``src``'s Hugging Face tokenizer into ``dst`` in PaddleNLP's layout; returns
    what was chosen (recorded in the conversion record). ``family_values``: the family
    row's ``hf_tokenizer_config`` (remote-code tokenizers), applied when ``src`` has a
    tokenizer."""
    for name in PLAIN_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if (src / SPM_HF).is_file():
        shutil.copyfile(src / SPM_HF, dst / SPM_HF)
        shutil.copyfile(src / SPM_HF, dst / SPM_PADDLE)
    config = _read_json(src / TOKENIZER_CONFIG)
    template_from = None
    if (src / CHAT_TEMPLATE_FILE).is_file():
        config["chat_template"] = (src / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        template_from = CHAT_TEMPLATE_FILE
    elif config.get("chat_template"):
        template_from = TOKENIZER_CONFIG
    if isinstance(config.get("chat_template"), list):
        # transformers' named-template list: PaddleNLP takes one jinja string
        named = {t.get("name"): t.get("template") for t in config["chat_template"]}
        config["chat_template"] = named.get("default") or next(iter(named.values()))
    cls = config.get("tokenizer_class")
    fast = (src / FAST_FILE).is_file()
    if cls:
        stem = cls.removesuffix("Fast")
        # transformers' AutoTokenizer uses the fast class when it can (use_fast=True by
        # default); PaddleNLP's uses the slow one unless the config names the fast class.
        config["tokenizer_class"] = f"{stem}Fast" if fast else stem
    applied = dict(family_values or {}) if tokenizer_files(src) else {}
    config.update(applied)
    if config.get("model_max_length", 0) > 1 << 40:
        config.pop("model_max_length")  # transformers' "no limit" sentinel
    config.pop("added_tokens_decoder", None)  # PaddleNLP 3.0.0b4 rebuilds them from the files
    (dst / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {
        "tokenizer_class": config.get("tokenizer_class"),
        "fast": fast,
        "chat_template_from": template_from,
        "legacy": config.get("legacy"),
        "family_values": applied,
    }


def write_hf_tokenizer(tokenizer: Any, saved: Path, out: Path, chat_template: str | None) -> None:
    """The run's tokenizer (``saved``: the run's ``final/`` where PaddleNLP saved it) in
    Hugging Face's layout, with ``chat_template`` (the template the run trained with)."""
    for name in PLAIN_FILES:
        if (saved / name).is_file():
            shutil.copyfile(saved / name, out / name)
    spm = saved / SPM_PADDLE if (saved / SPM_PADDLE).is_file() else saved / SPM_HF
    if spm.is_file():
        shutil.copyfile(spm, out / SPM_HF)
    config = _read_json(saved / TOKENIZER_CONFIG)
    for key in (
        "tokenizer_file",
        "vocab_file",
        "merges_file",
        "name_or_path",
        "special_tokens_map_file",
        "_from_auto",
        "added_tokens_decoder",
    ):
        config.pop(key, None)  # PaddleNLP's paths (of the run dir) and loader flags
    cls = str(config.get("tokenizer_class") or type(tokenizer).__name__)
    config["tokenizer_class"] = cls.removesuffix("Fast") if not (out / FAST_FILE).is_file() else cls
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            config[key] = str(value)
    if chat_template:
        config["chat_template"] = chat_template
        (out / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    else:
        config.pop("chat_template", None)
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    special = {
        k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def jinja_of(named: Any) -> str:
    """A jinja chat template rendering exactly what ftlab's named template trains on
    (``ftlab.data.templates.NamedTemplate``), for servers that apply the tokenizer's template."""

    def lit(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}"

    def block(fmt: str) -> str:
        head, _, tail = fmt.partition("{content}")
        return lit(head) + "{{ m['content'] }}" + lit(tail)

    bos = "{{ bos_token }}" if named.add_bos else ""
    eos = "{{ eos_token }}" if not named.assistant_end else lit(named.assistant_end)
    default = ""
    if named.default_system:
        default = (
            "{% if messages[0]['role'] != 'system' %}"
            + lit(named.system.format(content=named.default_system))
            + "{% endif %}"
        )
    return (
        bos
        + default
        + "{% for m in messages %}"
        + "{% if m['role'] == 'system' %}"
        + block(named.system)
        + "{% elif m['role'] == 'user' %}"
        + "{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'assistant' %}"
        + lit(named.after_answer)
        + "{% endif %}"
        + block(named.user)
        + "{% else %}"
        + lit(named.assistant_prefix)
        + "{{ m['content'] }}"
        + eos
        + "{% endif %}{% endfor %}"
        + "{% if add_generation_prompt %}"
        + lit(named.assistant_prefix)
        + "{% endif %}"
    )


def trained_template(setting: str | None, saved: Path) -> tuple[str | None, str]:
    """(jinja template, note) for the run's ``data.chat_template`` setting."""

    if setting in (None, "none", "null"):
        return None, "the run used plain concatenation (data.chat_template=null): no template"
    if setting == "tokenizer":
        template = _read_json(saved / TOKENIZER_CONFIG).get("chat_template")
        return template, "the tokenizer's own template (data.chat_template=tokenizer)"
    return jinja_of(NAMED_TEMPLATES[setting]), f"ftlab's named template {setting!r} as jinja"
