"""Argument files for PaddleNLP's preference scripts, from the ``run_finetune.json`` mapping.

``llm/alignment/dpo/run_dpo.py`` and ``llm/alignment/kto/run_kto.py`` parse a JSON file
into four dataclasses (``PdArgumentParser``): model arguments, data arguments, a
``TrainingArguments`` subclass (with ``llmmetaclass``'s fields) and the loss config. An
unknown key is an error there, so the file holds exactly the keys those dataclasses have
(their field names below, from PaddleNLP's ``dpo_argument.py`` at commit 9f438b8 and
``kto_argument.py`` at ef2ffc3, the versions that match the 3.0.0b4 wheel's
``llmmetaclass``); every ftlab setting they cannot express goes to the notes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.data.splits import resolve_split_files
from ftlab.errors import ConfigError, DataError

if TYPE_CHECKING:
    from ftlab.config.schema import RunConfig

MODEL_KEYS = frozenset(
    {
        "model_name_or_path",
        "tokenizer_name_or_path",
        "flash_mask",
        "weight_quantize_algo",
        "fuse_attention_qkv",
        "fuse_attention_ffn",
        "lora_rank",
        "lora_path",
        "rslora",
        "lora_plus_scale",
        "lora_alpha",
        "rslora_plus",
        "use_quick_lora",
    }
)
DATA_KEYS = {
    "dpo": frozenset(
        {
            "train_dataset_path",
            "dev_dataset_path",
            "max_seq_len",
            "max_prompt_len",
            "greedy_zero_padding",
            "lazy",
        }
    ),
    "kto": frozenset(
        {
            "train_dataset_path",
            "dev_dataset_path",
            "max_seq_len",
            "max_prompt_len",
            "greedy_zero_padding",
        }
    ),
}
TRAINING_EXTRA_KEYS = frozenset(
    {"unified_checkpoint", "unified_checkpoint_config", "autotuner_benchmark", "benchmark"}
)


def training_keys() -> frozenset[str]:
    """Every key the scripts' ``TrainingArguments`` subclass parses."""
    from paddlenlp.trainer import TrainingArguments
    from paddlenlp.transformers.configuration_utils import LlmMetaConfig

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    meta = {m[0] for m in LlmMetaConfig._get_all_meta()}
    return frozenset(base | meta | TRAINING_EXTRA_KEYS)


def _split_file(run: RunConfig, split: str, notes: list[str]) -> str | None:
    try:
        files = resolve_split_files(run.data, split)
    except DataError as err:
        raise ConfigError(f"mode=export: {err}") from None
    if not files:
        return None
    if len(files) > 1:
        notes.append(
            f"the {split} split is {len(files)} files; the script reads one file per split "
            f"({split}_dataset_path): concatenate them (the file named is the first)."
        )
    return str(files[0])


def preference_arguments(
    run: RunConfig,
    script: str,
    kind: str,
    finetune_args: dict[str, Any],
    loss_args: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """The ``run_dpo.py`` (``kind=dpo``) or ``run_kto.py`` (``kto``) argument dict."""
    name = Path(script).name
    d = run.data
    args: dict[str, Any] = {}
    train = _split_file(run, "train", notes)
    dev = _split_file(run, "dev", notes)
    args["train_dataset_path"] = train
    if dev is not None:
        args["dev_dataset_path"] = dev
    elif d.dev_from_train is not None:
        notes.append(
            f"data.dev_from_train: {name} needs a dev file (dev_dataset_path); write the "
            "held-out records to one."
        )
    args["max_seq_len"] = d.max_length
    args["max_prompt_len"] = d.src_length
    if d.packing == "greedy":
        args["greedy_zero_padding"] = True
    if d.packing == "none":
        notes.append(
            f"data.packing=none: {name} always packs several records per row (zero "
            "padding, one mask per record); the loss of each record is the same."
        )
    if d.format not in ("auto", "src_response"):
        notes.append(
            f"data.format={d.format}: {name} reads PaddleNLP's preference records (src, tgt, "
            "response, sort); convert the data first."
        )
    if d.chat_template is not None:
        notes.append(
            f"data.chat_template={d.chat_template!r}: {name} renders no chat template (it "
            "sets tokenizer.chat_template = None): plain prompt + response."
        )
    notes.append(
        f"truncation: {name} cuts both responses in proportion to their lengths when a "
        "record is too long; ftlab lets the shorter keep its tokens when it fits in half."
    )
    data_keys = DATA_KEYS[kind]
    known = MODEL_KEYS | training_keys() | data_keys | set(loss_args)
    for key, value in finetune_args.items():
        if key in known:
            args[key] = value
        elif key == "lora":
            args["lora"] = value  # the loss config's flag: LoRA model, reference = adapter off
        elif value not in (None, False, 0, 1.0, ""):
            notes.append(f"{key}={value!r}: {name} has no such setting; not exported.")
    args.update(loss_args)
    args["output_dir"] = str(Path(args["output_dir"]).with_name(f"{Path(name).stem}_output"))
    return {k: v for k, v in args.items() if v is not None}


def script_notes(notes: list[str], script: str) -> list[str]:
    """The methods' notes name ``run_finetune.py``; ``run_dpo.py`` and ``run_kto.py`` build
    their LoRA the same way (``get_lora_target_modules``: every projection; alpha 2 x rank,
    4 with rsLoRA), so the notes hold for them with the script's name."""
    name = Path(script).name
    return [n.replace("run_finetune.py", name) for n in notes]
