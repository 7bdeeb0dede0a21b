"""Long packed rows on CPU: dense masks vs FlashMask indices, ftlab vs PaddleNLP's path.

Run from the repository root: ``python bench/long_sequence.py`` (``make bench-long``;
tens of minutes on two cores, most of it the 8192 steps). Not part of the tests.

Data: the shipped demo text (``ftlab/assets/demo_text``, ~255k tokens), documents cut
only when longer than a row and packed greedy (``data.format=text data.packing=greedy``)
at ``max_length`` 512, 2048 and 8192; batch 1 row, as long-context training runs.

**Loader** (one fresh subprocess each, so peak RSS is its own): every row of the train set
through ``paddle.io.DataLoader`` with the collator, as the Trainer iterates it. Reports
the collated batch's bytes, the build and iteration seconds and the process's peak RSS.

* ``ftlab dense``: ftlab's pipeline, dense ``[B, L, L]`` bool masks built per batch;
* ``ftlab flashmask``: ftlab's pipeline with ``model.flash_mask=true`` (``[B, 1, L]``);
* ``paddlenlp dense`` / ``paddlenlp flashmask``: the same packs through PaddleNLP's own
  path as ``llm/run_finetune.py`` builds it: per-example ``attention_mask`` (np.tri) or
  ``attn_mask_startend_row_indices``, ``ZeroPaddingMapDataset(greedy_zero_padding=True)``
  (which builds every pack's dense mask when the dataset is built) and
  ``DataCollatorForSeq2Seq(padding="max_length")``.

**Step** (one subprocess each): a random Llama of 23.6M parameters (hidden 512, 8 layers,
8 heads, 4 key/value heads, intermediate 1408, vocab 512), full recompute, AdamW, fp32;
one warm-up step, then ``--steps`` timed steps (median) on the same rows:

* ``eager dense``: PaddleNLP's eager attention with the dense mask (the plain PaddleNLP
  path that is correct on CPU);
* ``flash flashmask``: flash attention with FlashMask indices; on CPU
  ``ftlab.models.attention`` attends each packed example alone (PaddleNLP's FlashMask
  kernel is GPU-only);
* ``flash dense``: flash attention with the dense mask through ftlab's CPU attention.

The step's first loss is printed for each: the three paths compute the same function.
``score share`` is ``sum(n_i^2) / L^2`` over the timed rows (``n_i``: the rows' example
lengths): the part of the ``L x L`` scores the per-example path computes.

On this machine's AMD EPYC, Paddle's MKL takes its generic code path: a 2048^3 fp32
matmul ran at ~17-22 GFLOP/s, and at 79 (1 thread) / 145 (2 threads) with
``MKL_DEBUG_CPU_TYPE=5`` set before the process starts. The steps here run as Paddle
starts by default (its ``OMP_NUM_THREADS=1``); matmuls are most of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LENGTHS = (512, 2048, 8192)
LOADERS = ("ftlab_dense", "ftlab_flashmask", "paddlenlp_dense", "paddlenlp_flashmask")
STEPS = ("eager_dense", "flash_flashmask", "flash_dense")
ARCH = {  # ~24M parameters (as in bench/plan_vs_measured.py)
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "tie_word_embeddings": False,
}
MIB = 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokenizer() -> Any:
    from paddlenlp.transformers import AutoTokenizer

    from ftlab.assets import asset_path

    tok = AutoTokenizer.from_pretrained(str(asset_path("stories260k")))
    tok.pad_token = "<unk>"
    tok.padding_side = "right"
    return tok


def ftlab_data(length: int, flash_mask: bool) -> Any:
    from ftlab.assets import asset_path
    from ftlab.config.schema import DataConfig
    from ftlab.data.build import build_data

    cfg = DataConfig(
        name="demo_text",
        path=str(asset_path("demo_text")),
        format="text",
        max_length=length,
        packing="greedy",
        shuffle=False,
    )
    return build_data(cfg, tokenizer(), seed=0, need_dev=False, flash_mask=flash_mask)


def batch_bytes(batch: dict[str, Any]) -> int:
    return int(sum(v.nbytes if hasattr(v, "nbytes") else 0 for v in batch.values()))


# --------------------------------------------------------------------------- loader


def paddlenlp_dataset(length: int, flash_mask: bool) -> tuple[Any, Any]:
    """The same examples through PaddleNLP's zero padding and collator (run_finetune.py)."""
    import numpy as np
    from paddlenlp.data import DataCollatorForSeq2Seq
    from paddlenlp.datasets import ZeroPaddingMapDataset

    store = ftlab_data(length, False).train_dataset.store
    records = []
    for i in range(len(store)):
        ex = store[i]
        n = len(ex.input_ids)
        rec = {"input_ids": ex.input_ids.tolist(), "labels": ex.labels.tolist()}
        if flash_mask:
            rec["attn_mask_startend_row_indices"] = [n] * n
        else:
            rec["attention_mask"] = np.tri(n, n, dtype=bool)
        records.append(rec)
    tok = tokenizer()
    dataset = ZeroPaddingMapDataset(records, tok, max_length=length, greedy_zero_padding=True)
    collate = DataCollatorForSeq2Seq(
        tok,
        padding="max_length",
        max_length=length,
        max_label_length=length,
        return_tensors="np",
        return_attention_mask=not flash_mask,
    )
    return dataset, collate


def run_loader(impl: str, length: int) -> dict[str, Any]:
    import paddle

    baseline = peak_rss_mib()
    start = time.perf_counter()
    if impl.startswith("ftlab"):
        data = ftlab_data(length, impl.endswith("flashmask"))
        dataset, collate = data.train_dataset, data.collate_fn
    else:
        dataset, collate = paddlenlp_dataset(length, impl.endswith("flashmask"))
    built = time.perf_counter() - start
    first = collate([dataset[0]])
    loader = paddle.io.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate)
    start = time.perf_counter()
    rows = 0
    for batch in loader:
        rows += int(batch["input_ids"].shape[0])
    iterated = time.perf_counter() - start
    return {
        "impl": impl,
        "length": length,
        "rows": rows,
        "batch_bytes": batch_bytes(first),
        "keys": sorted(first),
        "build_s": round(built, 2),
        "iterate_s": round(iterated, 2),
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


# --------------------------------------------------------------------------- step


def run_step(impl: str, length: int, steps: int) -> dict[str, Any]:
    import numpy as np
    import paddle
    from cpu_fast_path import bench_cpu_layers
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.models.attention import install_cpu_attention

    data = ftlab_data(length, impl == "flash_flashmask")
    rows = [data.train_dataset[i] for i in range(steps + 1)]
    paddle.seed(0)
    config = LlamaConfig(
        **ARCH,
        max_position_embeddings=length,
        use_flash_attention=impl.startswith("flash"),
        recompute=True,
        recompute_granularity="full",
    )
    model = LlamaForCausalLM(config)
    model.recompute_enable()
    install_cpu_attention(model)
    bench_cpu_layers(model)  # bench/cpu_fast_path.py's before / after
    model.train()
    params = sum(int(p.size) for p in model.parameters())
    opt = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
    times, losses = [], []
    timed = rows[1:] or rows  # --steps 0: the warm-up step is the one timed
    lens = [[int(n) for n in row.get("seq_lens", [len(row["input_ids"])])] for row in timed]
    share = sum(n * n for row in lens for n in row) / (len(lens) * length**2)
    for row in rows:
        batch = {k: paddle.to_tensor(v) for k, v in data.collate_fn([row]).items()}
        start = time.perf_counter()
        loss = model(**batch, return_dict=True).loss
        loss.backward()
        opt.step()
        opt.clear_grad()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {
        "impl": impl,
        "length": length,
        "params": params,
        "warmup_s": round(times[0], 2),
        # --steps 0: the one step is all there is (at 8192 a CPU step takes many minutes)
        "step_s": round(statistics.median(times[1:] or times), 2),
        "steps_s": [round(t, 2) for t in times[1:]],
        "losses": losses,
        "finite": bool(np.isfinite(losses).all()),
        "score_share": round(share, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


# --------------------------------------------------------------------------- driver


def child(args: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, *args]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_mib(x: float) -> str:
    return f"{x / MIB:,.2f} MiB" if x >= MIB else f"{x / 1024:,.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument(
        "--steps", type=int, default=2, help="timed steps after one warm-up (0: time that one)"
    )
    parser.add_argument("--no-steps", action="store_true", help="loader measurements only")
    parser.add_argument("--no-loader", action="store_true", help="step measurements only")
    parser.add_argument(
        "--paths", default=",".join(STEPS), help=f"step paths to time (of {', '.join(STEPS)})"
    )
    parser.add_argument("--step-timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_long_sequence.json")
    parser.add_argument("--part", choices=("loader", "step"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part == "loader":
        print(json.dumps(run_loader(args.impl, args.length)))
        return 0
    if args.part == "step":
        print(json.dumps(run_step(args.impl, args.length, args.steps)))
        return 0

    lengths = [int(x) for x in args.lengths.split(",")]
    results: list[dict[str, Any]] = []
    if not args.no_loader:
        print("loader: every row through paddle.io.DataLoader, batch 1 (process peak RSS)")
        print(f"{'L':>5} {'pipeline':<20} {'rows':>5} {'batch':>12} {'build s':>8} "
              f"{'iter s':>7} {'peak RSS':>9}")  # fmt: skip
    for length in [] if args.no_loader else lengths:
        for impl in LOADERS:
            r = child(["--part", "loader", "--impl", impl, "--length", str(length)], 3600)
            r.setdefault("impl", impl)
            r.setdefault("length", length)
            results.append({"part": "loader", **r})
            if "error" in r:
                print(f"{length:>5} {impl:<20} {r['error']}", flush=True)
                continue
            print(
                f"{length:>5} {impl:<20} {r['rows']:>5} {fmt_mib(r['batch_bytes']):>12} "
                f"{r['build_s']:>8} {r['iterate_s']:>7} {r['peak_rss_mib']:>6.0f} MiB",
                flush=True,
            )
        pair = {r["impl"]: r for r in results if r.get("length") == length and "batch_bytes" in r}
        if "ftlab_dense" in pair and "ftlab_flashmask" in pair:
            ratio = pair["ftlab_dense"]["batch_bytes"] / pair["ftlab_flashmask"]["batch_bytes"]
            print(f"{length:>5} collated batch bytes, dense / FlashMask indices: {ratio:,.0f}x")
    if not args.no_steps:
        print(f"\nstep: 23.6M Llama, full recompute, AdamW, median of {args.steps} after warm-up")
        print(f"{'L':>5} {'path':<16} {'step s':>7} {'warm-up s':>9} {'peak RSS':>9}  first loss"
              "  score share  steps s")  # fmt: skip
        for length in lengths:
            for impl in args.paths.split(","):
                cmd = ["--part", "step", "--impl", impl, "--length", str(length)]
                r = child([*cmd, "--steps", str(args.steps)], args.step_timeout)
                r.setdefault("impl", impl)
                r.setdefault("length", length)
                results.append({"part": "step", **r})
                if "error" in r:
                    print(f"{length:>5} {impl:<16} {r['error']}", flush=True)
                    continue
                print(
                    f"{length:>5} {impl:<16} {r['step_s']:>7} {r['warmup_s']:>9} "
                    f"{r['peak_rss_mib']:>6.0f} MiB  {r['losses'][0]:.6f}  "
                    f"{r['score_share']:>11}  {r['steps_s']}",
                    flush=True,
                )
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
