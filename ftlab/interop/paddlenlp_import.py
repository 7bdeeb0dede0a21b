"""``ftlab-import``: a PaddleNLP ``run_finetune.py`` argument file -> the ftlab run that
reproduces it; the inverse of ``mode=export``.

It reads back the same tables the export writes from, so no key name is restated here:
``training.arguments.TRAIN_KEYS`` (trainer settings), ``interop.paddlenlp_export.SCRIPT_KEYS``
(model and data paths and lengths), each method's ``argument_flag`` / ``argument_keys`` and
``import_arguments`` hook, and the paired functions for keys spelled differently on each
side (precision, parallel degrees, packing, schedule). The group options come from the conf
tree: the model option whose ``name_or_path`` is the file's, the precision option with its
dtype and AMP level, the parallel option with its degrees.

The values run_finetune.py would use are the file's over PaddleNLP's own defaults (the
field defaults of ``paddlenlp.trl``'s ``ModelConfig``, ``DataConfig`` and ``SFTConfig``), so
a key the file leaves out is reproduced too. Every key of the file is accounted for: carried
into an ftlab setting, at PaddleNLP's default with no effect, or listed as not expressible
with the reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftlab.config import schema
from ftlab.config.schema import (
    ModelArch,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainSettings,
)
from ftlab.config.trainer_options import OPTIMIZERS
from ftlab.distributed.layout import PARALLEL_KEYS, parallel_from_arguments
from ftlab.errors import ConfigError
from ftlab.interop.paddlenlp_export import (
    FIXED_KEYS,
    SCRIPT_KEYS,
    packing_from_arguments,
    schedule_from_arguments,
)
from ftlab.methods.catalog import registered_methods
from ftlab.models.config_json import resolve_model
from ftlab.models.families import FAMILIES
from ftlab.models.hub_cache import local_model_dir
from ftlab.resolve.best_checkpoint import check_best_checkpoint
from ftlab.training.arguments import (
    AMP_LEVEL_KEY,
    PRECISION_FLAGS,
    TRAIN_KEYS,
    precision_from_arguments,
)

# Keys whose values belong to the script's own run, not to the experiment.
# run_finetune.py keys ``_trainer_options`` reads.
TRAINER_OPTION_KEYS = (
    "optim",
    "offload_optim",
    "recompute_granularity",
    "no_recompute_layers",
    "refined_recompute",
    "report_to",
    "eval_with_do_generation",
    "save_generation_output",
)
SCRIPT_OWNED = {"output_dir": "ftlab writes everything into its run dir under outputs/"}
# Why common run_finetune.py keys have no ftlab setting (others: "no ftlab setting").
NO_SETTING = {
    "disable_tqdm": "ftlab's console shows its own progress bar",
    "eval_accumulation_steps": "ftlab's evaluation computes the loss batch by batch",
    "eval_with_do_generation": "ftlab's task metric (eval.demo_metric) generates on dev records",
    "pipeline_parallel_config": "ftlab sets the pipeline options its batches need itself",
}
# Keys of the schedule functions (read by schedule_from_arguments).
SCHEDULE_KEYS = (
    "max_steps",
    "num_train_epochs",
    "evaluation_strategy",
    "eval_steps",
    "save_strategy",
    "save_steps",
)


@dataclass
class Imported:
    """What an argument file asks for, in ftlab's terms."""

    source: dict[str, Any]  # the file's keys and values
    choices: dict[str, str] = field(default_factory=dict)  # group -> option
    settings: dict[str, Any] = field(default_factory=dict)  # dotted setting -> value
    expressed: list[str] = field(default_factory=list)  # file keys carried into settings
    at_default: list[str] = field(default_factory=list)  # file keys at PaddleNLP's default
    unsupported: dict[str, str] = field(default_factory=dict)  # file key -> why not
    # Keys the file leaves to PaddleNLP's default, where ftlab cannot follow (key -> why).
    default_gaps: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the import assumed


def read_argument_file(path: Path) -> dict[str, Any]:
    """The JSON object of an argument file; a clear error when it is not one."""
    try:
        args = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory; give the argument file (a .json).") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason}).") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be an argument file.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})."
        ) from None
    if not isinstance(args, dict):
        raise ConfigError(f"{path}: expected a JSON object of run_finetune.py arguments.")
    return args


def check_value_types(source: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A number or flag of the wrong JSON type (``"learning_rate": "abc"``, ``"lora_rank":
    null``) is refused naming the key: PaddleNLP's parser passes JSON values on unchecked,
    so the run would fail later, far from the file."""
    kinds = ((bool, "true or false"), (int, "a whole number"), (float, "a number"))
    for key, value in source.items():
        default = defaults.get(key)
        for kind, words in kinds:
            if isinstance(default, kind):
                ok = (
                    isinstance(value, bool)
                    if kind is bool
                    else (
                        not isinstance(value, bool)
                        and isinstance(value, int if kind is int else (int, float))
                    )
                )
                if not ok:
                    raise ConfigError(
                        f"{key}={json.dumps(value)}: run_finetune.py expects {words} here "
                        f"(its default is {json.dumps(default)}). Fix the argument file."
                    )
                break


def script_defaults() -> dict[str, Any]:
    """PaddleNLP's default for every key run_finetune.py parses (its wheel dataclasses)."""
    from paddlenlp.trl import DataConfig, ModelConfig, SFTConfig

    out: dict[str, Any] = {}
    for cls in (ModelConfig, DataConfig, SFTConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def read_options(conf_dir: Path, group: str) -> dict[str, dict[str, Any]]:
    """Every option of a group as its YAML body (the schema's defaults not filled in)."""
    raw = {
        path.stem: yaml.safe_load(path.read_text()) or {}
        for path in sorted((conf_dir / group).glob("*.yaml"))
    }

    def body(name: str) -> dict[str, Any]:
        own = dict(raw[name])
        merged: dict[str, Any] = {}
        for entry in own.pop("defaults", None) or []:
            if isinstance(entry, str) and entry in raw:  # extends another option
                merged.update(body(entry))
        merged.update(own)
        return merged

    return {name: body(name) for name in raw}


def import_arguments(
    source: dict[str, Any], conf_dir: Path, defaults: dict[str, Any] | None = None
) -> Imported:
    """The ftlab group options and settings that reproduce ``source``."""
    base = script_defaults() if defaults is None else defaults
    check_value_types(source, base)
    args = {**base, **source}
    out = Imported(source=dict(source))
    used: set[str] = set()

    model = _model(args, conf_dir, out)
    used.add("model_name_or_path")
    _data(args, conf_dir, out, used)
    _precision(args, conf_dir, out)
    used.update([AMP_LEVEL_KEY, *PRECISION_FLAGS.values()])
    _parallel(args, conf_dir, out)
    used.update(PARALLEL_KEYS)
    _method(args, model, out, used)
    trainer_gaps = _trainer_options(args, out, used)

    for key, dotted in [*TRAIN_KEYS.items(), *SCRIPT_KEYS.items()]:
        used.add(key)
        if dotted in out.settings or key == "model_name_or_path":
            continue
        value = args.get(key)
        if value is None and not _optional(dotted):
            out.unsupported[key] = f"None has no ftlab equivalent for {dotted} (an int)"
        elif value is not None or key in source:
            out.settings[dotted] = value
    unsupported: dict[str, str] = {}
    out.settings.update(schedule_from_arguments(args, unsupported))
    used.update(SCHEDULE_KEYS)
    _best_checkpoint(out.settings, unsupported)
    for key, value in FIXED_KEYS.items():
        if args.get(key) != value:
            unsupported[key] = {
                "do_train": "ftlab always trains",
                "do_eval": "ftlab always evaluates on the dev split at the end",
                "unified_checkpoint": "ftlab always saves unified (safetensors) checkpoints",
            }.get(key, f"ftlab always sets {key}={value}")
        used.add(key)
    unsupported.update(out.unsupported)
    unsupported.update(trainer_gaps)
    unsupported.update({k: v for k, v in SCRIPT_OWNED.items() if k in source})

    # Account for every key of the file.
    out.unsupported = {}
    for key, value in source.items():
        if key in unsupported:
            out.unsupported[key] = unsupported[key]
        elif key in used:
            out.expressed.append(key)
        elif key in base and base[key] == value:
            out.at_default.append(key)
        else:
            out.unsupported[key] = NO_SETTING.get(key, "no ftlab setting")
    out.default_gaps = {k: v for k, v in unsupported.items() if k not in source}
    for key, why in out.default_gaps.items():
        out.notes.append(f"PaddleNLP's default {key}={args.get(key)!r} (not in the file): {why}.")
    return out


BEST_KEYS = ("load_best_model_at_end", "metric_for_best_model", "greater_is_better")


def _best_checkpoint(settings: dict[str, Any], unsupported: dict[str, str]) -> None:
    """The best-checkpoint keys, carried when ftlab can rank checkpoints the same way
    (a metric its evaluations compute, evaluations that meet saves); else all three are
    listed as not expressible, with the reason: one without the others would change
    what the file asks for."""

    names = ("eval_steps", "save_steps", *BEST_KEYS)
    present = {n: settings[f"train.{n}"] for n in names if f"train.{n}" in settings}
    try:
        check_best_checkpoint(TrainSettings(**present), likelihood=True)
    except ConfigError as err:
        for key in BEST_KEYS:
            if settings.pop(f"train.{key}", None) not in (None, False):
                unsupported[key] = str(err).removeprefix("train.").rstrip(".")


def _optional(dotted: str) -> bool:
    """Whether the ftlab setting ``dotted`` accepts None (its schema type says so)."""
    section, _, name = dotted.partition(".")
    cls = {"train": schema.TrainSettings, "model": schema.ModelConfig, "data": schema.DataConfig}
    fields = {f.name: f for f in dataclasses.fields(cls[section])}
    return "None" in str(fields[name].type)


# --------------------------------------------------------------------------- groups


def _trainer_options(args: dict[str, Any], out: Imported, used: set[str]) -> dict[str, str]:
    """Optimizer, recompute details, trackers and the generation metric; returns the keys
    ftlab cannot express (key -> why)."""
    gaps: dict[str, str] = {}
    used.update(TRAINER_OPTION_KEYS)
    optim = str(args.get("optim") or "adamw")
    if optim in OPTIMIZERS:
        out.settings["train.optim"] = optim
    else:
        gaps["optim"] = f"ftlab trains with {', '.join(OPTIMIZERS)}"
    out.settings["train.offload_optim"] = bool(args.get("offload_optim"))
    if args.get("recompute"):
        out.settings["train.recompute_granularity"] = args.get("recompute_granularity") or "full"
        if args.get("no_recompute_layers"):
            out.settings["train.no_recompute_layers"] = list(args["no_recompute_layers"])
        if isinstance(args.get("refined_recompute"), str) and args["refined_recompute"]:
            out.settings["train.refined_recompute"] = args["refined_recompute"]
    report = args.get("report_to")
    if report is None or report == "all":
        gaps["report_to"] = (
            "PaddleNLP reports to every installed tracker; ftlab to the ones train.report_to "
            "lists (visualdl unless set)"
        )
    else:
        names = [report] if isinstance(report, str) else list(report)
        out.settings["train.report_to"] = [n for n in names if n != "none"]
    out.settings["eval.generation"] = bool(args.get("eval_with_do_generation"))
    return gaps


def _model(args: dict[str, Any], conf_dir: Path, out: Imported) -> ModelConfig:
    path = str(args.get("model_name_or_path") or "")
    if not path:
        raise ConfigError(
            "model_name_or_path is missing: run_finetune.py needs it, and so does ftlab."
        )
    options = read_options(conf_dir, "model")
    exact = [name for name, body in options.items() if body.get("name_or_path") == path]
    # a local checkpoint, or a hub name's snapshot in the local Hugging Face cache
    config = (local_model_dir(path) or Path(path).expanduser()) / "config.json"
    if exact:
        option = exact[0]
    elif config.is_file():
        hf = json.loads(config.read_text())
        fam = hf.get("model_type", "llama")
        option = next((n for n, b in options.items() if b.get("family") == fam), None)
        if option is None:
            raise ConfigError(
                f"model_name_or_path={path}: its config.json says model_type={fam!r}, which "
                f"no ftlab model option has (families: {', '.join(sorted(FAMILIES))})."
            )
        out.settings["model.name_or_path"] = path
        out.settings["model.name"] = Path(path).name
        out.notes.append(
            f"model_name_or_path={path}: a local checkpoint; ftlab reads its family and "
            f"model.arch from its config.json (model={option} gives the other defaults)."
        )
    else:
        names = {n: str(b.get("name_or_path", "")) for n, b in options.items()}
        close = difflib.get_close_matches(path, list(names.values()), n=1, cutoff=0.0)
        option = next(n for n, p in names.items() if p == close[0])
        out.settings["model.name_or_path"] = path
        out.settings["model.name"] = path.rstrip("/").rsplit("/", 1)[-1]
        out.notes.append(
            f"model_name_or_path={path} is no ftlab model option and not a local checkpoint: "
            f"the architecture numbers of model={option} ({names[option]}) were kept, which "
            "validation and the plan use. Set model.arch.* to this model's numbers, or add "
            "conf/model/<name>.yaml for it."
        )
    out.choices["model"] = option
    body = options[option]
    local = config.is_file()
    model = ModelConfig(
        name=str(out.settings.get("model.name", body.get("name", option))),
        name_or_path=str(out.settings.get("model.name_or_path", body.get("name_or_path"))),
        # A local checkpoint's family and numbers come from its config.json.
        family=None if local else body.get("family"),
        arch=ModelArch() if local else ModelArch(**(body.get("arch") or {})),
        lora_target_modules=body.get("lora_target_modules"),
    )
    return resolve_model(model)


def _data(args: dict[str, Any], conf_dir: Path, out: Imported, used: set[str]) -> None:
    path = args.get("dataset_name_or_path")
    options = read_options(conf_dir, "data")
    same = [n for n, b in options.items() if b.get("path") == path]
    # run_finetune.py reads src/tgt records; an option of that format whose data is not
    # shipped with ftlab (its path is the user's).
    src_tgt = [
        n
        for n, b in options.items()
        if b.get("format") == "src_tgt" and "${asset:" not in str(b.get("path", ""))
    ]
    out.choices["data"] = (same or src_tgt or sorted(options))[0]
    out.settings["data.format"] = "src_tgt"
    out.settings["data.packing"] = packing_from_arguments(args)
    used.update(("zero_padding", "greedy_zero_padding"))
    template = args.get("chat_template")
    if template is not None:
        if template == args.get("model_name_or_path"):
            out.settings["data.chat_template"] = "tokenizer"
            used.add("chat_template")
        else:
            out.unsupported["chat_template"] = (
                "a chat_template.json file; ftlab's data.chat_template takes tokenizer or a "
                "named template (chatml, llama3, alpaca)"
            )


def _precision(args: dict[str, Any], conf_dir: Path, out: Imported) -> None:
    dtype, level = precision_from_arguments(args)
    schema = PrecisionConfig()
    for name, body in read_options(conf_dir, "precision").items():
        if (body.get("dtype", schema.dtype), body.get("amp_level", schema.amp_level)) == (
            dtype,
            level,
        ):
            out.choices["precision"] = name
            return
    raise ConfigError(
        f"precision {dtype} at AMP level {level}: no option of conf/precision has it "
        "(add one, with dtype and amp_level)."
    )


def _parallel(args: dict[str, Any], conf_dir: Path, out: Imported) -> None:
    wanted = parallel_from_arguments(args)
    schema = ParallelConfig()
    # An argument file names its degrees: parallel=auto (ftlab chooses them) is no match.
    options = {k: v for k, v in read_options(conf_dir, "parallel").items() if k != "auto"}
    shape = ("tensor", "pipeline", "sharding_stage", "sequence_parallel", "offload")

    weights = {"tensor": 16, "pipeline": 16, "sharding_stage": 8, "sequence_parallel": 4}

    def score(body: dict[str, Any]) -> tuple[int, int]:
        """Options that share the degrees first, then the flags; no fixed data degree or
        process count (the file does not say how many devices run it)."""
        same = sum(weights.get(k, 2) for k in shape if body.get(k, getattr(schema, k)) == wanted[k])
        sharding_ok = wanted["sharding"] in (None, body.get("sharding", schema.sharding))
        fixed = body.get("data") is not None or body.get("nproc_per_node") is not None
        return same + sharding_ok, -int(fixed)

    option = max(sorted(options), key=lambda n: score(options[n]))
    out.choices["parallel"] = option
    body = options[option]
    for key in (*shape, "sharding"):
        value = wanted[key]
        if value is not None and body.get(key, getattr(schema, key)) != value:
            out.settings[f"parallel.{key}"] = value
    if body.get("data") is not None:
        out.settings["parallel.data"] = None
    if wanted["sharding"] is None:
        degree = out.settings.get("parallel.sharding", body.get("sharding", schema.sharding))
        out.notes.append(
            "sharding_parallel_degree is not set: PaddleNLP shards over every data-parallel "
            f"rank, known only at launch; parallel.sharding={degree} was assumed. Set it to "
            "your device count / (tensor x pipeline)."
        )
    out.notes.append(
        "devices: run_finetune.py takes the process count from its launcher (--devices), "
        "not from this file; add parallel.data=N (or parallel.nproc_per_node) for "
        "data parallelism over more devices."
    )


def _method(args: dict[str, Any], model: ModelConfig, out: Imported, used: set[str]) -> None:
    found = []
    for name, cls in sorted(registered_methods().items()):
        notes: list[str] = []
        result = cls().import_arguments(args, model, notes)
        if result is not None:
            found.append((len(result[1]), name, result, notes))
    if not found:
        raise ConfigError("no ftlab method reads these arguments (not even full fine-tuning).")
    found.sort(key=lambda x: (-x[0], x[1]))
    if len(found) > 1 and found[0][0] == found[1][0] and found[0][0] > 0:
        raise ConfigError(
            f"the arguments select both method={found[0][1]} and method={found[1][1]}: "
            "run_finetune.py would use one of them; remove the other's flag."
        )
    _, name, (settings, keys), notes = found[0]
    out.choices["method"] = name
    out.settings.update({f"method.{k}": v for k, v in settings.items()})
    out.notes += notes
    used.update(keys)
    if args.get("neftune"):
        out.settings["method.neftune_noise_alpha"] = float(args.get("neftune_noise_alpha", 5.0))
        out.notes.append(
            "NEFTune: ftlab scales the noise by alpha/sqrt(seq_len*hidden), run_finetune.py "
            "by alpha/sqrt(batch*seq_len); the noise magnitudes differ."
        )
    used.update(("neftune", "neftune_noise_alpha"))
