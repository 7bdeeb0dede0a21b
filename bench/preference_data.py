"""Preference data throughput: ftlab's preference pipeline vs PaddleNLP's run_dpo.py path.

Writes N preference pairs (the shipped demo pairs, repeated; PaddleNLP's src/tgt/response/
sort records) to a temporary directory and times, in one process:

  ftlab      build_preference_data(...): read + check + tokenize (sentencepiece batch
             encoder) + rows + pack (zero_padding), then one pass of the collator
  paddlenlp  load_dataset("json") -> map(preprocess_preference_data) -> ZeroPaddingMapDataset,
             as llm/alignment/dpo/run_dpo.py builds its train set (dense [L, L] masks),
             then one pass of preference_collate_fn

and prints pairs/s and tokens/s for each, with the packing efficiency.

Usage: python bench/preference_data.py [--n 20000] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH = 8


def make_corpus(path: Path, n: int) -> None:
    from ftlab.demo.make_preferences import build_pairs

    pairs, _ = build_pairs()
    with open(path, "w") as f:
        for i in range(n):
            p = pairs[i % len(pairs)]
            f.write(json.dumps({k: p[k] for k in ("src", "tgt", "response", "sort")}) + "\n")


def run_ftlab(tok: Any, data_dir: Path, max_length: int, src_length: int) -> dict[str, Any]:
    from ftlab.config.schema import DataConfig
    from ftlab.data.preference_examples import build_preference_data

    cfg = DataConfig(
        name="bench",
        path=str(data_dir),
        format="src_response",
        packing="zero_padding",
        max_length=max_length,
        src_length=src_length,
        shuffle=False,
    )
    start = time.perf_counter()
    data = build_preference_data(cfg, tok, kind="pairwise", seed=0, need_dev=False)
    ds = data.train_dataset
    for i in range(0, len(ds), BATCH):
        data.collate_fn([ds[j] for j in range(i, min(i + BATCH, len(ds)))])
    seconds = time.perf_counter() - start
    s = data.stats.train
    return {
        "seconds": seconds,
        "pairs": s.examples,
        "tokens": s.tokens,
        "rows": s.packs,
        "efficiency": s.packing_efficiency,
    }


def run_paddlenlp(tok: Any, data_dir: Path, max_length: int, src_length: int) -> dict[str, Any]:
    from paddlenlp.datasets import ZeroPaddingMapDataset, load_dataset
    from paddlenlp.trl import preference_collate_fn, preprocess_preference_data

    tok.chat_template = None  # as run_dpo.py
    data_args = SimpleNamespace(max_seq_len=max_length, max_prompt_len=src_length)
    model_args = SimpleNamespace(flash_mask=False)
    start = time.perf_counter()
    ds = load_dataset("json", data_files=str(data_dir / "train.json"), lazy=False)[0]
    ds = ds.map(
        partial(
            preprocess_preference_data, tokenizer=tok, data_args=data_args, model_args=model_args
        )
    )
    packed = ZeroPaddingMapDataset(ds, tokenizer=tok, max_length=max_length)
    collate = partial(preference_collate_fn, max_seq_len=max_length)
    for i in range(0, len(packed), BATCH):
        collate([packed[j] for j in range(i, min(i + BATCH, len(packed)))])
    seconds = time.perf_counter() - start
    tokens = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    return {
        "seconds": seconds,
        "pairs": len(ds),
        "tokens": tokens,
        "rows": len(packed),
        "efficiency": round(tokens / (len(packed) * max_length), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--src-length", type=int, default=256)
    args = parser.parse_args()

    from paddlenlp.transformers import AutoTokenizer

    from ftlab.assets import asset_path

    tok = AutoTokenizer.from_pretrained(str(asset_path("stories260k")))
    tok.pad_token = "<unk>"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tmp) / "hf_cache"))
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        make_corpus(data_dir / "train.json", args.n)
        print(
            f"corpus: {args.n} demo preference pairs, max_length={args.max_length}, "
            f"src_length={args.src_length}, tokenizer stories260k, {os.cpu_count()} CPUs, "
            f"collated in batches of {BATCH} rows"
        )
        rows = [
            ("ftlab zero_padding", run_ftlab(tok, data_dir, args.max_length, args.src_length)),
            (
                "paddlenlp run_dpo.py path",
                run_paddlenlp(tok, data_dir, args.max_length, args.src_length),
            ),
        ]
    print(
        f"{'pipeline':28s} {'seconds':>8s} {'pairs/s':>9s} {'tokens/s':>10s} "
        f"{'rows':>7s} {'efficiency':>10s}"
    )
    for label, r in rows:
        print(
            f"{label:28s} {r['seconds']:8.2f} {r['pairs'] / r['seconds']:9.0f} "
            f"{r['tokens'] / r['seconds']:10.0f} {r['rows']:7d} {r['efficiency']:10.4f}"
        )
    ratio = rows[1][1]["seconds"] / rows[0][1]["seconds"]
    print(f"ftlab is {ratio:.2f}x as fast as PaddleNLP's path on the same pairs")


if __name__ == "__main__":
    main()
