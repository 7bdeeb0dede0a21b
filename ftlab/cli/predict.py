"""``ftlab-predict``: generate from a trained run (or a base model plus adapter).

    ftlab-predict outputs/2026-11-23/10-00-00_stories260k_lora --input prompts.jsonl \\
        --output generations.jsonl --max-new-tokens 64

Each input line is a JSON object with the prompt under ``src`` (ftlab's training format)
or ``prompt``; each output line is the input object plus ``output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ftlab.cli.console import tool_console
from ftlab.cli.process_exit import console_script
from ftlab.config.cpu_runtime import use_fast_mkl_path
from ftlab.data.records import BadRecords, iter_records
from ftlab.data.stats import SplitStats
from ftlab.errors import DataError, FtlabError
from ftlab.evaluation.generation import generate_texts
from ftlab.methods.reopen import load_trained, load_with_adapter
from ftlab.record.index import is_run_dir

PROMPT_KEYS = ("src", "prompt")
ALLOW_PICKLE_HELP = (
    "read pickled weights (*.pdparams, pytorch_model.bin) if no safetensors: they run code "
    "when read; ftlab's model.allow_pickle=true. Only for files you trust"
)


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The prompt records of ``path``, read by the same rules as training data.

    ``ftlab.data.records`` reads the file: UTF-8 (a BOM is fine), one JSON object per
    line, blank lines skipped; a line that is not valid UTF-8 or JSON, not an object, or
    repeats a key is an error naming ``file:line``.
    """
    if not path.is_file():
        raise DataError(f"--input {path}: no such file.")
    stats = SplitStats()
    records = []
    for record in iter_records(path, BadRecords("error", stats, hint="Fix the line."), stats):
        if not any(isinstance(record.data.get(k), str) for k in PROMPT_KEYS):
            raise DataError(f"{record.where}: needs a string field 'src' or 'prompt'.")
        records.append(record.data)
    if not records:
        raise DataError(f"--input {path}: no prompts in the file.")
    return records


def check_output(output: Path, input_path: Path) -> None:
    """Refuse an --output that would replace the prompts or change a run's record (a run
    dir, finished or not, is written by its run only: ``ftlab-runs`` reads it back)."""

    target = output.expanduser().resolve()
    if target == input_path.expanduser().resolve():
        raise DataError(f"--output {output} is the --input file: it would replace the prompts.")
    if target.is_dir():
        raise DataError(f"--output {output} is a directory; give a file name.")
    for parent in target.parents:
        if is_run_dir(parent):
            raise DataError(
                f"--output {output} is inside the run dir {parent}: a run's record is not "
                "changed by later commands. Write the generations outside any run dir."
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ftlab-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", type=Path, help="a run directory made by ftlab")
    p.add_argument("--base", help="base model (name or path), with --adapter instead of run_dir")
    p.add_argument("--adapter", type=Path, help="a saved adapter/model dir (a run's final/)")
    p.add_argument("--input", type=Path, required=True, help="JSON lines with src or prompt")
    p.add_argument("--output", type=Path, required=True, help="JSON lines to write")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--strategy", choices=("greedy", "sampling"), default="greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    args = p.parse_args(argv)
    if (args.run_dir is None) == (args.adapter is None):
        p.error("give a run_dir, or --base and --adapter")
    if args.adapter is not None and args.base is None:
        p.error("--adapter needs --base")
    return args


def check_generation_args(args: argparse.Namespace) -> None:
    """The generation options within what can work (else an error deep in generation)."""
    bad = [
        (args.batch_size < 1, f"--batch-size {args.batch_size}: must be >= 1"),
        (args.max_new_tokens < 1, f"--max-new-tokens {args.max_new_tokens}: must be >= 1"),
        (args.top_k < 0, f"--top-k {args.top_k}: must be >= 0 (0 turns it off)"),
        (not 0.0 < args.top_p <= 1.0, f"--top-p {args.top_p}: must be in (0, 1]"),
        (not args.temperature > 0.0, f"--temperature {args.temperature}: must be > 0"),
    ]
    for wrong, message in bad:
        if wrong:
            raise DataError(message + ".")


def main(argv: list[str] | None = None) -> int:
    use_fast_mkl_path()  # before Paddle loads (ftlab/config/cpu_runtime.py)
    tool_console()
    args = parse_args(argv)
    try:
        check_generation_args(args)
        check_output(args.output, args.input)
        records = read_prompts(args.input)
        if args.run_dir is not None:
            model, tokenizer = load_trained(args.run_dir, allow_pickle=args.allow_pickle)
        else:
            model, tokenizer = load_with_adapter(
                args.base, args.adapter, allow_pickle=args.allow_pickle
            )
        prompts = [next(r[k] for k in PROMPT_KEYS if isinstance(r.get(k), str)) for r in records]
        outputs = generate_texts(
            model,
            tokenizer,
            prompts,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            strategy=args.strategy,
            top_k=args.top_k,
            top_p=args.top_p,
            temperature=args.temperature,
            seed=args.seed,
        )
    except FtlabError as err:
        print(f"ftlab-predict: error: {err}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record, output in zip(records, outputs, strict=True):
            f.write(json.dumps({**record, "output": output}, ensure_ascii=False) + "\n")
    tmp.replace(args.output)
    print(f"wrote {len(outputs)} generations to {args.output}")
    return 0


# The console script (pyproject.toml): ends without interpreter teardown (process_exit).
console_main = console_script(main)

if __name__ == "__main__":
    sys.exit(main())
