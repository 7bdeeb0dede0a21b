"""``ftlab --help``: what ftlab is, generated from the conf tree so it stays current.

Hydra renders ``hydra.help.template`` (``conf/hydra/help/ftlab.yaml``), which is one
interpolation, ``${ftlab_help:${hydra.runtime.choices}}``: this module's resolver. Each
group is listed in the order of ``conf/train.yaml``'s defaults list, each option with the
first comment line of its YAML file, so a new option documents itself by that line.
Schemas (``base_*``) live outside the groups and never show.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ftlab.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# One line per group; a group without a line here is listed without one.
GROUP_LINES = {
    "model": "the base model (hub name or local dir; model.arch holds its numbers)",
    "method": "how it is fine-tuned (full, LoRA and its variants, QLoRA, PEFT methods)",
    "data": "the dataset (data.path: a dir with train.json and dev.json, JSON lines)",
    "parallel": "the layout over devices (degrees overridable: parallel.tensor=4)",
    "precision": "compute dtype and AMP level (16-bit is GPU only)",
    "experiment": "overlays that set several groups and settings at once",
}

MODES = (
    ("train", "validate, then fine-tune and write the run dir (default)"),
    ("plan", "layout, parameter counts and memory per device; loads nothing"),
    ("export", "write run_finetune.json for PaddleNLP's llm/run_finetune.py"),
)

COMMON_OVERRIDES = (
    ("train.max_steps=100", "optimizer steps (-1: use train.num_train_epochs)"),
    ("train.learning_rate=3e-4", "peak learning rate (train.lr_scheduler_type, warmup_steps)"),
    ("train.per_device_train_batch_size=8", "micro batch per device"),
    ("train.gradient_accumulation_steps=4", "micro batches per optimizer step"),
    ("method.lora_rank=16", "LoRA rank (method.lora_alpha, method.target_modules)"),
    ("data.path=DIR", "your data; data.format=auto|src_tgt|alpaca|messages"),
    ("data.max_length=1024", "prompt + answer tokens (data.src_length: prompt)"),
    ("data.packing=greedy", "pack several examples per row (none|zero_padding|greedy)"),
    ("model.name_or_path=DIR", "a local checkpoint instead of the hub name"),
    ("device=gpu", "with mode=plan|export: check for a GPU machine (target.*)"),
    ("verbose=true", "also print PaddleNLP's log (always in <run dir>/train.log)"),
    ("rerun=RUN_DIR", "the same config again, in a new run dir (resume=RUN_DIR: continue)"),
)

COMMANDS = (
    ("ftlab-runs [DIR]", "list runs; --compare RUN RUN ...: settings, metrics, loss curves"),
    ("ftlab-predict RUN_DIR", "generate from a run's model (--input prompts.jsonl)"),
    ("ftlab-merge RUN_DIR", "fold the adapter into the base, write a model dir"),
    ("ftlab-import ARGS.json", "the ftlab command for a PaddleNLP run_finetune.py argument file"),
    ("ftlab-sweep SWEEP_DIR", "(re)write a sweep's summary"),
)


def option_line(path: Path) -> str:
    """The first comment line of an option's YAML file (after a ``@package`` line)."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            return ""
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text
    return ""


def group_order(conf_dir: Path) -> list[str]:
    """Groups in ``train.yaml``'s defaults order, then any other option directories."""
    defaults = yaml.safe_load((conf_dir / "train.yaml").read_text()).get("defaults", [])
    named = []
    for entry in defaults:
        if isinstance(entry, dict):
            key = next(iter(entry)).replace("optional ", "").replace("override ", "").strip()
            named.append(key.lstrip("/"))
    dirs = sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra")
    return [g for g in named if g in dirs] + [g for g in dirs if g not in named]


def group_options(conf_dir: Path, group: str) -> list[tuple[str, str]]:
    """(option, one-line description) of every YAML option of ``group``."""
    return [(p.stem, option_line(p)) for p in sorted((conf_dir / group).glob("*.yaml"))]


def option_advice(group: str, option: str, conf_dir: Path = CONF_DIR) -> str | None:
    """The message for ``group=option`` naming no option: the options and the closest one
    (None for a group ftlab does not ship, whose Hydra message stays)."""
    import difflib

    if not (conf_dir / group).is_dir() or group == "hydra":
        return None
    if option.startswith("base_"):
        return (
            f"an option of conf/{group}/ names its schema as '- {option}'; schemas live outside "
            f"the groups, so write '- /{option}@_here_' in its defaults list."
        )
    options = [name for name, _ in group_options(conf_dir, group)]
    close = difflib.get_close_matches(option, options, n=1, cutoff=0.3)
    return (
        f"{group}={option}: no such {group} option. Options: {', '.join(options)}."
        + (f" Closest: {group}={close[0]}." if close else "")
        + " (ftlab --help says what each is.)"
    )


def check_selected_options(choices: Mapping[str, Any], sources: list[Any]) -> None:
    """Refuse a selected option that does not exist. Hydra skips a missing option of an
    ``optional`` group (``experiment=typo``) and runs without it; ftlab does not."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance().repo
    for group, option in choices.items():
        if option is None or group.startswith("hydra"):
            continue
        files = [Path(s.path) / group / f"{option}.yaml" for s in sources if s.schema == "file"]
        node: Any = store
        for part in group.split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if any(f.is_file() for f in files) or f"{option}.yaml" in node:
            continue
        raise ConfigError(option_advice(group, str(option)) or f"{group}={option}: no such option.")


def _rows(rows: list[tuple[str, str]], indent: str = "  ", marks: Mapping[str, str] = {}) -> str:
    width = max((len(a) for a, _ in rows), default=0)
    return "\n".join(
        f"{indent}{marks.get(a, ' ')} {a.ljust(width)}  {b}".rstrip()
        if marks
        else f"{indent}{a.ljust(width)}  {b}".rstrip()
        for a, b in rows
    )


def help_text(choices: Mapping[str, Any] | None = None, conf_dir: Path = CONF_DIR) -> str:
    """The whole help page; ``choices`` (group -> selected option) marks the selection."""
    choices = dict(choices or {})
    out = [
        "ftlab: fine-tune large language models on PaddlePaddle / PaddleNLP.",
        "",
        "A run is composed from one option per config group plus any KEY=VALUE overrides,",
        "validated before anything heavy loads, trained with PaddleNLP's Trainer, and",
        "recorded in a run dir under outputs/ (config, metrics, summary, final/ model).",
        "",
        "  ftlab [GROUP=OPTION ...] [KEY=VALUE ...]     one run",
        "  ftlab -m KEY=A,B [KEY=C,D ...]               a sweep: one run per combination",
        "  ftlab mode=plan device=gpu method=qlora model=llama3 parallel=tp4 precision=bf16",
        "",
        "Config groups (* = selected now):",
    ]
    for group in group_order(conf_dir):
        options = group_options(conf_dir, group)
        if not options:
            continue
        line = GROUP_LINES.get(group, "")
        out.append(f"  {group}" + (f": {line}" if line else ""))
        selected = choices.get(group)
        out.append(_rows(options, indent="    ", marks={str(selected): "*"}))
    out += [
        "",
        "Modes (mode=...):",
        _rows(list(MODES)),
        "",
        "Common overrides (every setting and its value: ftlab --cfg job [overrides]):",
        _rows(list(COMMON_OVERRIDES)),
        "",
        "Other commands:",
        _rows(list(COMMANDS)),
        "",
        "Hydra: ftlab --hydra-help (its flags), --cfg job, --info, --shell-completion",
        "(install=bash). The docs (docs/, make docs) are the full map.",
    ]
    # Hydra passes the rendered text through string.Template: keep a literal $ as $$.
    return "\n".join(out).replace("$", "$$")


def _resolver(choices: Any = None) -> str:
    if choices is not None and not isinstance(choices, Mapping):
        choices = OmegaConf.to_container(choices)
    return help_text(choices)


def register_help_resolver() -> None:
    """``${ftlab_help:CHOICES}``: the help page (``conf/hydra/help/ftlab.yaml``)."""
    if not OmegaConf.has_resolver("ftlab_help"):
        OmegaConf.register_new_resolver("ftlab_help", _resolver)
    _list_groups_only_when_shown()


def _list_groups_only_when_shown() -> None:
    """Hydra's ``get_help`` lists every config group twice (``$APP_CONFIG_GROUPS``,
    ``$HYDRA_CONFIG_GROUPS``) whether the template shows them or not: ~90 group listings,
    each deep-copying the whole config repository, 1.5 s of the 2.4 s of CPU time that
    ``ftlab --help`` took. ftlab's page lists its groups itself (``help_text``), so the
    listings are made only for a template that names them (``--hydra-help``'s does);
    the page is substituted exactly as Hydra does it."""
    import string

    from hydra._internal.hydra import Hydra

    original = Hydra.get_help
    if getattr(original, "ftlab_lazy_groups", False):
        return

    def get_help(self: Any, help_cfg: Any, cfg: Any, args_parser: Any, resolve: bool) -> str:
        template = help_cfg.template
        if "CONFIG_GROUPS" in template:
            return original(self, help_cfg, cfg, args_parser, resolve)
        return string.Template(template).substitute(
            FLAGS_HELP=self.format_args_help(args_parser),
            HYDRA_CONFIG_GROUPS="",
            APP_CONFIG_GROUPS="",
            CONFIG=OmegaConf.to_yaml(cfg, resolve=resolve),
        )

    get_help.ftlab_lazy_groups = True  # type: ignore[attr-defined]
    get_help.__wrapped__ = original  # type: ignore[attr-defined]
    Hydra.get_help = get_help  # type: ignore[method-assign]
