"""``ftlab-merge``: fold a trained adapter into its base model's weights.

    ftlab-merge outputs/2026-11-23/10-00-00_stories260k_lora            # -> RUN_DIR/merged
    ftlab-merge RUN_DIR --out merged_model
    ftlab-merge --base path/or/hub-name --adapter RUN_DIR/final --out merged_model
    ftlab-merge RUN_DIR --format hf --out DIR [--max-shard-size 5GB] [--dtype bfloat16]

``--format hf`` writes Hugging Face's layout (transformers, vLLM, SGLang, TGI read it:
``ftlab.interop.hf_out``); ``--out`` must be a new directory outside the run directory.

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

from ftlab.cli.console import tool_console
from ftlab.cli.predict import ALLOW_PICKLE_HELP
from ftlab.cli.process_exit import console_script
from ftlab.config.cpu_runtime import use_fast_mkl_path
from ftlab.errors import ConfigError, FtlabError, ModelLoadError
from ftlab.interop.hf_tokenizer import trained_template
from ftlab.methods.reopen import (
    check_mergeable,
    load_trained,
    load_with_adapter,
    merge_model,
    method_of,
)
from ftlab.models.families import FAMILIES
from ftlab.record.rundir import METHOD_RECORD, RESOLVED_CONFIG, RunDir

MERGE_RECORD = "ftlab_merged.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ftlab-merge", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", type=Path, help="a run directory made by ftlab")
    p.add_argument("--base", help="base model (hub name or path), with --adapter")
    p.add_argument("--adapter", type=Path, help="a saved directory (a run's final/)")
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/merged)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="dtype to load the base in (--base only) and, with --format hf, to write",
    )
    p.add_argument(
        "--format",
        choices=("paddle", "hf", "hf-peft"),
        default="paddle",
        help="paddle: PaddleNLP's layout (default); hf: Hugging Face's; hf-peft: the LoRA "
        "adapter unmerged, as a PEFT adapter",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="--format hf: largest shard (default 5GB)"
    )
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    args = p.parse_args(argv)
    if args.format.startswith("hf") and args.out is None:
        p.error(f"--format {args.format} needs --out (a new directory outside the run directory)")
    if (args.run_dir is None) == (args.adapter is None):
        p.error("give a run_dir, or --base and --adapter")
    if args.adapter is not None and (args.base is None or args.out is None):
        p.error("--adapter needs --base and --out")
    return args


def run(args: argparse.Namespace) -> Path:
    final = args.adapter if args.adapter is not None else RunDir(args.run_dir).final
    if not (final / METHOD_RECORD).is_file():
        raise ModelLoadError(
            f"{final} has no {METHOD_RECORD}: not a finished ftlab run (or its final/ dir)."
        )
    method_name = method_of(final)
    if args.format == "hf-peft":  # files only: nothing is merged or loaded
        from ftlab.interop.hf_out import check_peft_method, export_peft

        check_peft_method(method_name)
        base = args.base or json.loads((final / METHOD_RECORD).read_text()).get("base_model")
        return export_peft(final, args.out, base, {"method": method_name, "base_model": base})
    check_mergeable(method_name)  # before loading anything
    out = args.out if args.out is not None else RunDir(args.run_dir).merged
    if args.format == "hf":
        from ftlab.interop.hf_out import check_out_dir, parse_size

        check_out_dir(out)
        max_shard = parse_size(args.max_shard_size)
    elif out.exists() and any(out.iterdir()):
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
    record = {
        "method": method_name,
        "base_model": base,
        "adapter": str(final.resolve()),
        "probe_max_abs_logit_diff": diff,
    }
    if args.format == "hf":
        return _export_hf(args, merged, tokenizer, final, base, out, max_shard, record)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _export_hf(
    args: argparse.Namespace,
    merged: object,
    tokenizer: object,
    final: Path,
    base: str | None,
    out: Path,
    max_shard: int,
    record: dict,
) -> Path:
    from ftlab.interop.hf_in import base_config_json
    from ftlab.interop.hf_out import export_hf

    setting = _chat_template_setting(args.run_dir)
    template, note = trained_template(setting, final)
    family = FAMILIES[merged.config.model_type]  # type: ignore[attr-defined]
    return export_hf(
        merged,
        tokenizer,
        out=out,
        family=family,
        base_config=base_config_json(base),
        tokenizer_dir=final,
        chat_template=template,
        dtype=args.dtype,
        max_shard_bytes=max_shard,
        record={**record, "chat_template": note},
    )


def _chat_template_setting(run_dir: Path | None) -> str | None:
    """The chat template the run trained with (``model.chat_template`` over
    ``data.chat_template``); ``tokenizer`` for ``--adapter`` (no run config)."""
    if run_dir is None:
        return "tokenizer"
    from omegaconf import OmegaConf

    body = OmegaConf.load(Path(run_dir) / RESOLVED_CONFIG)
    model = body.model.get("chat_template")
    if model is not None:
        return None if model == "none" else str(model)
    data = body.data.get("chat_template")
    return None if data is None else str(data)


def main(argv: list[str] | None = None) -> int:
    use_fast_mkl_path()  # before Paddle loads (ftlab/config/cpu_runtime.py)
    tool_console()
    args = parse_args(argv)
    try:
        out = run(args)
    except FtlabError as err:
        print(f"ftlab-merge: error: {err}", file=sys.stderr)
        return 2
    print(f"{'adapter' if args.format == 'hf-peft' else 'merged model'} written to {out}")
    return 0


# The console script (pyproject.toml): ends without interpreter teardown (process_exit).
console_main = console_script(main)

if __name__ == "__main__":
    sys.exit(main())
