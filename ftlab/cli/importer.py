"""``ftlab-import ARGUMENT.json``: the ftlab command that reproduces a PaddleNLP
``run_finetune.py`` argument file (``llm/config/<model>/*_argument.json``).

Prints the command (group options, then the settings that differ from what those options
give), the keys it carried over, and every key it cannot express with the reason; with
``--save NAME`` it also writes ``conf/experiment/NAME.yaml`` (run it as
``ftlab experiment=NAME``). The mapping is ``ftlab.interop.paddlenlp_import``, the inverse of
``mode=export``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from ftlab.cli.console import ignore_noise_warnings
from ftlab.cli.help import CONF_DIR
from ftlab.errors import FtlabError
from ftlab.interop.paddlenlp_import import Imported, import_arguments, read_argument_file
from ftlab.resolve.compose import register_configs, to_run_config

GROUPS = ("model", "method", "data", "parallel", "precision")
PLAIN = re.compile(r"[A-Za-z0-9_./:+*-]+")


def override_value(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    keyword = text.lower() in ("true", "false", "null") or _is_number(text)
    if PLAIN.fullmatch(text) and not keyword:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def composed_settings(choices: dict[str, str], conf_dir: Path, overrides: list[str]) -> Any:
    """The typed run config of ``choices`` plus ``overrides`` (composed like ``ftlab``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            cfg = compose("train", overrides=[f"{g}={o}" for g, o in choices.items()] + overrides)
        return to_run_config(cfg)
    finally:
        GlobalHydra.instance().clear()


def _get(run: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        run = getattr(run, part)
    return run


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def command_overrides(imported: Imported, conf_dir: Path) -> list[str]:
    """``group=option`` for every group, then the settings the options do not already give;
    checked by composing them: the result holds every imported value."""
    groups = [f"{g}={imported.choices[g]}" for g in GROUPS if g in imported.choices]
    base = composed_settings(imported.choices, conf_dir, [])
    settings = [
        f"{dotted}={override_value(value)}"
        for dotted, value in imported.settings.items()
        if not _same(_get(base, dotted), value)
    ]
    run = composed_settings(imported.choices, conf_dir, settings)
    wrong = [d for d, v in imported.settings.items() if not _same(_get(run, d), v)]
    if wrong:
        raise FtlabError(f"ftlab-import: the command does not reproduce {', '.join(wrong)}.")
    return groups + settings


def experiment_yaml(imported: Imported, source: Path, name: str) -> str:
    """``conf/experiment/NAME.yaml``: the same run as a Hydra experiment overlay."""
    body: dict[str, Any] = {}
    for dotted, value in imported.settings.items():
        node = body
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    lines = [
        "# @package _global_",
        f"# Imported from {source.name} (PaddleNLP run_finetune.py arguments) by ftlab-import.",
        f"# Run it with `ftlab experiment={name}`. Not expressible in ftlab: "
        f"{', '.join(imported.unsupported) or 'none'}.",
        "defaults:",
        *[f"  - override /{g}: {imported.choices[g]}" for g in GROUPS if g in imported.choices],
        "  - _self_",
        "",
        yaml.safe_dump(body, sort_keys=False).rstrip(),
        "",
    ]
    return "\n".join(lines)


def report(imported: Imported, overrides: list[str], source: Path) -> str:
    command = " ".join(["ftlab", *(shlex.quote(o) for o in overrides)])
    lines = [
        f"ftlab command for {source}:",
        f"  {command}",
        "",
        f"carried over ({len(imported.expressed)} keys): {', '.join(imported.expressed)}",
    ]
    if imported.at_default:
        lines.append(
            f"at PaddleNLP's default, nothing to carry ({len(imported.at_default)}): "
            + ", ".join(imported.at_default)
        )
    if imported.unsupported:
        lines.append(f"not expressible in ftlab ({len(imported.unsupported)} keys):")
        lines += [
            f"  - {k}={imported.source[k]!r}: {why}" for k, why in imported.unsupported.items()
        ]
    if imported.notes:
        lines.append("assumed:")
        lines += [f"  - {n}" for n in imported.notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ftlab-import",
        description="Print the ftlab command that reproduces a PaddleNLP run_finetune.py "
        "argument file; list every key it cannot express.",
    )
    parser.add_argument("argument_file", type=Path, help="e.g. llm/config/llama/lora_argument.json")
    parser.add_argument(
        "--save",
        metavar="NAME",
        help="also write conf/experiment/NAME.yaml (ftlab experiment=NAME)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing experiment")
    parser.add_argument("--conf-dir", type=Path, default=CONF_DIR, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``ftlab-import``)."""
    ignore_noise_warnings()
    args = parse_args(argv)
    try:
        imported = import_arguments(read_argument_file(args.argument_file), args.conf_dir)
        overrides = command_overrides(imported, args.conf_dir)
        print(report(imported, overrides, args.argument_file))
        if args.save:
            if not re.fullmatch(r"\w+", args.save):
                raise FtlabError(f"--save {args.save!r}: use letters, digits and _ only.")
            path = args.conf_dir / "experiment" / f"{args.save}.yaml"
            if path.exists() and not args.force:
                raise FtlabError(f"{path} exists; pass --force to overwrite it.")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(experiment_yaml(imported, args.argument_file, args.save))
            print(f"\nwrote {path}: run it with  ftlab experiment={args.save}")
    except FtlabError as err:
        print(f"ftlab-import: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
