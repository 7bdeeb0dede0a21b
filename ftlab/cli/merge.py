"""``ftlab-merge``: fold a trained adapter into its base model's weights.

    ftlab-merge outputs/2026-11-23/10-00-00_stories260k_lora            # -> RUN_DIR/merged
    ftlab-merge RUN_DIR --out merged_model
    ftlab-merge --base path/or/hub-name --adapter RUN_DIR/final --out merged_model

The result is a plain safetensors model directory (plus tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads with no ftlab or PEFT code: LoRA and its
variants, VeRA, LoKr, MoRA and QLoRA (dequantized) merge. Prefix tuning and ReFT add
computation that no weight matrix can absorb; for those the command exits with status 2
and says why. Before writing, the merged model's logits are compared with the adapter
model's on a probe prompt, and a mismatch is an error, never a silently wrong model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ftlab.cli.predict import ALLOW_PICKLE_HELP
from ftlab.errors import ConfigError, FtlabError, ModelLoadError

MERGE_RECORD = "ftlab_merged.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ftlab-merge", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", type=Path, help="a run directory made by ftlab")
    p.add_argument("--base", help="base model (hub name or path), with --adapter")
    p.add_argument("--adapter", type=Path, help="a saved directory (a run's final/)")
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/merged)")
    p.add_argument("--dtype", default="float32", help="dtype to load the base in (--base only)")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    args = p.parse_args(argv)
    if (args.run_dir is None) == (args.adapter is None):
        p.error("give a run_dir, or --base and --adapter")
    if args.adapter is not None and (args.base is None or args.out is None):
        p.error("--adapter needs --base and --out")
    return args


def run(args: argparse.Namespace) -> Path:
    from ftlab.methods.reopen import (
        check_mergeable,
        load_trained,
        load_with_adapter,
        merge_model,
        method_of,
    )
    from ftlab.record.rundir import METHOD_RECORD, RunDir

    final = args.adapter if args.adapter is not None else RunDir(args.run_dir).final
    if not (final / METHOD_RECORD).is_file():
        raise ModelLoadError(
            f"{final} has no {METHOD_RECORD}: not a finished ftlab run (or its final/ dir)."
        )
    method_name = method_of(final)
    check_mergeable(method_name)  # before loading anything
    out = args.out if args.out is not None else RunDir(args.run_dir).merged
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new directory.")
    if args.adapter is not None:
        model, tokenizer = load_with_adapter(
            args.base, args.adapter, dtype=args.dtype, allow_pickle=args.allow_pickle
        )
        base = args.base
    else:
        model, tokenizer = load_trained(args.run_dir, allow_pickle=args.allow_pickle)
        base = json.loads((final / METHOD_RECORD).read_text()).get("base_model")
    merged, diff = merge_model(model, tokenizer, method_name)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / MERGE_RECORD).write_text(
        json.dumps(
            {
                "method": method_name,
                "base_model": base,
                "adapter": str(final.resolve()),
                "probe_max_abs_logit_diff": diff,
            },
            indent=2,
        )
        + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from ftlab.cli.console import tool_console

    tool_console()
    args = parse_args(argv)
    try:
        out = run(args)
    except FtlabError as err:
        print(f"ftlab-merge: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
