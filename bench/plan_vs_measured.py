"""``ftlab mode=plan`` memory estimates against measured peak RSS of real ``ftlab`` runs (CPU).

Run from the repository root: ``python bench/plan_vs_measured.py`` (a few minutes on two
cores). Not part of the tests.

For each model (the shipped stories260K and a random-init ~24M-parameter Llama saved to a
temporary directory) and method (full, LoRA, QLoRA nf4) it runs

* ``ftlab mode=plan ...`` and reads ``plan.json`` (no weights loaded), and
* ``ftlab ...`` with the same overrides for a few steps, and reads the peak RSS the trainer
  logged at each training step in ``metrics.jsonl`` (``ru_maxrss``: the process lifetime
  peak up to that step, model loading included; final saving is not included),

and prints the estimate, the measurement and the error. Packing (zero padding) fills every
sequence to ``data.max_length``, the length the plan assumes.

RSS holds the Python/Paddle/PaddleNLP runtime besides the tensors; the plan adds it as the
constant ``ftlab.planning.plan.CPU_RUNTIME_BASELINE_MIB``. ``--baseline`` measures that
constant: the peak RSS of a run whose tensors are negligible (1 layer, hidden 16, one
sequence of 64).

``--fit`` prints the per-layer activation coefficients the plan uses, refitted from
Paddle's own allocator counts (``host_memory_stat``) of PaddleNLP's eager Llama.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ftlab.planning.plan import CPU_RUNTIME_BASELINE_MIB

REPO = Path(__file__).resolve().parents[1]
# ftlab's CLI, plus a record of Paddle's host-allocator peak (bytes of live tensors, the
# quantity the plan models) next to the RSS the trainer logs at every training step.
WRAPPER = """
import json, os, sys
import paddle.base.core as core
import ftlab.training.trainer as tr
rss = tr.peak_memory_mb
def both():
    with open(os.environ["FTLAB_BENCH_ALLOC"], "a") as f:
        f.write(json.dumps(core.host_memory_stat_peak_value("Allocated", 0) / 2**20) + "\\n")
    return rss()
tr.peak_memory_mb = both
sys.argv = ["ftlab", *sys.argv[1:]]
from ftlab.cli.app import main
main()
"""
FTLAB = [sys.executable, "-c", WRAPPER]
# glibc's default malloc keeps freed heap memory (its mmap threshold grows with the largest
# freed block), so RSS stays above the live tensors; a fixed threshold turns that off.
NO_RETENTION = {"MALLOC_MMAP_THRESHOLD_": "65536"}
STORIES = REPO / "ftlab" / "assets" / "stories260k"

COMMON = [
    "data.max_length=256",
    "data.src_length=128",
    "data.packing=zero_padding",
    "train.per_device_train_batch_size=4",
    "train.per_device_eval_batch_size=4",
    "train.max_steps=3",
    "train.logging_steps=1",
    "train.warmup_steps=0",
    "eval.demo_metric=false",
    "eval.generation=false",
    "device=cpu",
]
MEDIUM = {  # ~24M parameters
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
TINY = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
METHODS = {
    "full": ["method=full"],
    "lora": ["method=lora"],
    "qlora": ["method=qlora", "method.quant_algo=nf4", "method.quant_backend=ftlab"],
}


def save_random_llama(arch: dict, out: Path) -> None:
    """A random-init Llama checkpoint (safetensors) that ftlab can load by path."""
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.seed(0)
    config = LlamaConfig(**arch, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)


def model_overrides(name: str, path: Path, arch: dict) -> list[str]:
    out = [
        f"model.name={name}",
        f"model.name_or_path={path}",
        f"model.tokenizer_name_or_path={STORIES}",
    ]
    return out + [
        f"model.arch.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in arch.items()
    ]


def run_ftlab(overrides: list[str], run_dir: Path, env: dict[str, str] | None = None) -> None:
    cmd = [*FTLAB, *overrides, f"hydra.run.dir={run_dir}"]
    alloc = {"FTLAB_BENCH_ALLOC": str(run_dir) + ".alloc"}
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **alloc, **(env or {})}
    )
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise SystemExit(f"ftlab failed ({' '.join(overrides)}):\n{tail}")


def plan_mib(overrides: list[str], run_dir: Path) -> dict:
    run_ftlab([*overrides, "mode=plan"], run_dir)
    return json.loads((run_dir / "plan.json").read_text())["memory_mib"]


def measured_peak_mib(
    overrides: list[str], run_dir: Path, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """(peak RSS, peak Paddle host allocation) over the training steps, MiB."""
    run_ftlab(overrides, run_dir, env)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    alloc = [json.loads(x) for x in Path(str(run_dir) + ".alloc").read_text().split()]
    return max(r["peak_memory_mb"] for r in rows if r.get("kind") == "train"), max(alloc)


def baseline(tmp: Path) -> None:
    save_random_llama(TINY, tmp / "tiny")
    over = [
        *model_overrides("tiny", tmp / "tiny", TINY),
        *COMMON,
        "method=full",
        "data.max_length=64",
        "data.src_length=32",
        "data.packing=none",
        "train.per_device_train_batch_size=1",
        "train.per_device_eval_batch_size=1",
    ]
    plan = plan_mib(over, tmp / "tiny_plan")
    tensors = plan["in_use"]
    for name, env in (("glibc default", None), ("no heap retention", NO_RETENTION)):
        peak, alloc = measured_peak_mib(over, tmp / f"tiny_train_{bool(env)}", env)
        print(
            f"tiny model, {name}: peak RSS {peak:.1f} MiB, Paddle allocator peak "
            f"{alloc:.2f} MiB, planned tensors {tensors:.2f} MiB -> runtime baseline "
            f"{peak - alloc:.0f} MiB (ftlab.planning.plan.CPU_RUNTIME_BASELINE_MIB)"
        )


def rows(methods: list[str], recompute: bool, optims: list[str], granularities: list[str]):
    """(method, optimizer, recompute granularity or None) per row of the table."""
    out = [(m, "adamw", g) for m in methods for g in ([None, "full"] if recompute else [None])]
    out += [("full", o, None) for o in optims if o != "adamw"]
    out += [(m, "adamw", g) for m in ("full", "lora") for g in granularities]
    seen: list = []
    return [r for r in out if not (r in seen or seen.append(r))]


def table(
    tmp: Path,
    methods: list[str],
    recompute: bool,
    optims: list[str],
    granularities: list[str],
    only: list[str],
) -> None:
    save_random_llama(MEDIUM, tmp / "medium")
    models = {
        "stories260k": ["model=stories260k"],
        "llama-24m": model_overrides("llama24m", tmp / "medium", MEDIUM),
    }
    models = {k: v for k, v in models.items() if k in only}
    header = (
        f"{'model':11} {'method':6} {'optim':10} {'rc':9} {'weights':>7} {'grads':>6} {'optim':>6} "
        f"{'activ':>6} | {'tensors':>7} {'alloc':>6} {'err':>5} | {'est RSS':>7} "
        f"{'RSS':>6} {'err':>6} | {'RSS nr':>6} {'err':>5}"
    )
    print(header)
    print("-" * len(header))
    for model, model_over in models.items():
        for method, optim, granularity in rows(methods, recompute, optims, granularities):
            rc = granularity is not None
            over = [
                *model_over,
                *METHODS[method],
                *COMMON,
                f"train.optim={optim}",
                f"train.recompute={str(rc).lower()}",
                *([f"train.recompute_granularity={granularity}"] if rc else []),
            ]
            tag = f"{model}_{method}_{optim}_{granularity}"
            plan = plan_mib(over, tmp / f"{tag}_plan")
            rss, alloc = measured_peak_mib(over, tmp / f"{tag}_train")
            rss_nr, _ = measured_peak_mib(over, tmp / f"{tag}_train_nr", NO_RETENTION)
            act = plan["activations_recompute"] if rc else plan["activations"]
            est = plan["estimated_rss"]

            def err(est: float, meas: float) -> str:
                return f"{100 * (est - meas) / meas:+.0f}%"

            print(
                f"{model:11} {method:6} {optim:10} {granularity or 'off':9} {plan['weights']:7.1f} "
                f"{plan['gradients']:6.1f} {plan['optimizer']:6.1f} {act:6.1f} | "
                f"{plan['in_use']:7.1f} {alloc:6.1f} {err(plan['in_use'], alloc):>5} | "
                f"{est:7.1f} {rss:6.1f} {err(est, rss):>6} | {rss_nr:6.1f} "
                f"{err(est, rss_nr):>5}",
                flush=True,
            )
    print(
        "MiB. optim: train.optim; rc: train.recompute_granularity (off: no recompute). "
        "tensors: the plan without the runtime baseline; alloc: Paddle's host-allocator "
        "peak over the training steps; est RSS = tensors + runtime baseline "
        f"({CPU_RUNTIME_BASELINE_MIB:.0f} MiB); RSS: peak ru_maxrss over the training steps "
        "(glibc default); RSS nr: the same with MALLOC_MMAP_THRESHOLD_=65536 (no heap "
        "retention)."
    )


def fit(granularity: str | None = None) -> None:
    """Refit the per-layer activation coefficients from Paddle's allocator counts: what the
    forward pass keeps for backward, without recompute or (``granularity``) with it."""
    import numpy as np
    import paddle
    import paddle.base.core as core
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    def saved_bytes(h: int, i: int, layers: int, heads: int, kv: int, s: int) -> int:
        config = LlamaConfig(
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=512,
            max_position_embeddings=1024,
            recompute=granularity is not None,
            recompute_granularity=granularity or "full",
        )
        model = LlamaForCausalLM(config)
        if granularity is not None:
            model.train()
            model.recompute_enable()  # what the Trainer does for train.recompute=true
        ids = paddle.randint(0, 512, [4, s])
        before = core.host_memory_stat_current_value("Allocated", 0)
        loss = model(input_ids=ids, labels=ids)[0]
        saved = core.host_memory_stat_current_value("Allocated", 0) - before
        del loss
        return saved

    rows, ys = [], []
    for h, i, heads, kv, s in [
        (64, 172, 8, 4, 128),
        (128, 344, 8, 4, 128),
        (128, 344, 8, 8, 128),
        (128, 344, 16, 4, 128),
        (128, 344, 8, 4, 256),
        (128, 1024, 8, 4, 128),
        (192, 344, 8, 4, 128),
    ]:
        per_layer = (saved_bytes(h, i, 3, heads, kv, s) - saved_bytes(h, i, 1, heads, kv, s)) / 2
        rows.append([h, kv * h // heads, i, heads * s])
        ys.append(per_layer / 4 / (4 * s))  # fp32 elements per token
    coef, *_ = np.linalg.lstsq(np.array(rows, float), np.array(ys), rcond=None)
    print(
        f"recompute {granularity or 'off'}: elements kept per token and layer = "
        f"{coef[0]:.2f} h + {coef[1]:.2f} kv_dim + {coef[2]:.2f} ffn + {coef[3]:.2f} heads*seq"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", action="store_true", help="measure the runtime baseline")
    ap.add_argument("--fit", action="store_true", help="refit the activation coefficients")
    ap.add_argument("--methods", default="full,lora,qlora", help="comma-separated")
    ap.add_argument("--recompute", action="store_true", help="also rows with recompute")
    ap.add_argument("--models", default="stories260k,llama-24m", help="comma-separated")
    ap.add_argument(
        "--optims",
        default="adamw,adamw_mini",
        help="optimizers measured with full fine-tuning (comma-separated)",
    )
    ap.add_argument(
        "--granularities",
        default="full,full_attn,core_attn",
        help="recompute granularities measured with full and LoRA (comma-separated; '' none)",
    )
    args = ap.parse_args()
    if args.fit:
        for granularity in (None, "full", "full_attn", "core_attn"):
            fit(granularity)
        return
    with tempfile.TemporaryDirectory(prefix="ftlab_plan_bench_") as d:
        if args.baseline:
            baseline(Path(d))
        else:
            table(
                Path(d),
                args.methods.split(","),
                args.recompute,
                [o for o in args.optims.split(",") if o],
                [g for g in args.granularities.split(",") if g],
                args.models.split(","),
            )


if __name__ == "__main__":
    main()
