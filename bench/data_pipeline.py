"""Data pipeline throughput: ftlab's build_data vs PaddleNLP's own dataset path, same data.

Generates N src/tgt examples (short stories, ~110 tokens each with the stories260k
tokenizer) into a temporary directory, then times, in one process:

  ftlab      build_data(...): read + check + tokenize (sentencepiece batch encoder) + pack
  paddlenlp  load_dataset("json", ...) -> MapDataset.map(convert) -> ZeroPaddingMapDataset,
             where convert is the src/tgt conversion of PaddleNLP's llm/ fine-tuning scripts
             (tokenizer calls on source and target, shift, per-example masks)

and prints examples/s and tokens/s for each, for in-order and greedy packing.

PaddleNLP's llm/ path has two mask layouts: a dense [L, L] mask per example and pack
(``--paddlenlp-mask dense``; memory grows as L^2 per pack: ~5 GB for 100k examples at
L=512, so use it with a smaller --n) and, with flash-mask, one start-row index per token
(``startend``, the default here, compact like ftlab's packs).

Usage: python bench/data_pipeline.py [--n 100000] [--max-length 512] [--paddlenlp-mask startend]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Amy", "Sam", "Tim", "Zoe"]
ANIMALS = ["cat", "dog", "bird", "frog", "duck", "fox", "cow", "bear"]
THINGS = ["red ball", "blue kite", "green hat", "big box", "white bag", "old doll"]
SENTENCES = [
    "{n} the {a} liked to play with a {t}.",
    "One day, {n} went to the park with the {t}.",
    "The {a} saw a friend who had no toys.",
    "They played all day and laughed a lot.",
    "Then it started to rain, so they ran home.",
    "Mom gave them warm milk and a big hug.",
    '{n} said, "I love my {t} so much!"',
    "The sun came out again and the sky was blue.",
]


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            name, animal, thing = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(THINGS)
            src = f"Write a short story about a {animal} named {name} and a {thing}."
            body = [
                s.format(n=name, a=animal, t=thing)
                for s in rng.sample(SENTENCES, rng.randint(2, 6))
            ]
            tgt = f"Once upon a time, there was a {animal} named {name}. " + " ".join(body)
            f.write(json.dumps({"src": src, "tgt": tgt}) + "\n")


def run_ftlab(
    tok: Any, data_dir: Path, packing: str, max_length: int, src_length: int
) -> dict[str, Any]:
    from ftlab.config.schema import DataConfig
    from ftlab.data.build import build_data

    # shuffle=False: pack in file order, like PaddleNLP's path (same packs for zero_padding)
    cfg = DataConfig(
        name="bench",
        path=str(data_dir),
        packing=packing,
        max_length=max_length,
        src_length=src_length,
        shuffle=False,
    )
    start = time.perf_counter()
    data = build_data(cfg, tok, seed=0, need_dev=False)
    seconds = time.perf_counter() - start
    s = data.stats.train
    return {
        "seconds": seconds,
        "examples": s.examples,
        "tokens": s.tokens,
        "packs": s.packs,
        "efficiency": s.packing_efficiency,
    }


def convert_example(
    example: dict, tokenizer: Any, src_length: int, max_length: int, mask: str
) -> dict:
    """The src/tgt conversion of PaddleNLP's llm/ scripts (convert_example_common)."""
    source = tokenizer(
        example["src"],
        max_length=src_length,
        truncation=True,
        truncation_side="left",
        add_special_tokens=True,
    )
    tgt_max = max_length - len(source["input_ids"])
    target = tokenizer(
        example["tgt"],
        max_length=tgt_max,
        truncation=True,
        truncation_side="right",
        add_special_tokens=False,
    )["input_ids"]
    if len(target) < tgt_max:
        target += [tokenizer.eos_token_id]
    input_ids = source["input_ids"] + target
    n_src = len(source["input_ids"])
    labels = [-100] * n_src + input_ids[n_src:]
    input_ids, labels = input_ids[:-1], labels[1:]
    seq = len(input_ids)
    features = {"input_ids": input_ids, "labels": labels, "position_ids": list(range(seq))}
    if mask == "dense":
        features["attention_mask"] = np.tri(seq, seq, dtype=bool)
    else:
        features["attn_mask_startend_row_indices"] = [seq] * seq
    return features


def run_paddlenlp(
    tok: Any, data_dir: Path, greedy: bool, max_length: int, src_length: int, mask: str
) -> dict[str, Any]:
    from paddlenlp.datasets import ZeroPaddingMapDataset, load_dataset

    start = time.perf_counter()
    ds = load_dataset("json", data_files=str(data_dir / "train.json"), lazy=False)[0]
    ds = ds.map(
        partial(
            convert_example, tokenizer=tok, src_length=src_length, max_length=max_length, mask=mask
        )
    )
    packed = ZeroPaddingMapDataset(ds, tok, max_length=max_length, greedy_zero_padding=greedy)
    seconds = time.perf_counter() - start
    tokens = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    return {
        "seconds": seconds,
        "examples": len(ds),
        "tokens": tokens,
        "packs": len(packed),
        "efficiency": round(tokens / (len(packed) * max_length), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--src-length", type=int, default=256)
    parser.add_argument("--paddlenlp-mask", choices=["startend", "dense"], default="startend")
    parser.add_argument("--skip-paddlenlp", action="store_true")
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
            f"corpus: {args.n} src/tgt examples, max_length={args.max_length}, "
            f"src_length={args.src_length}, tokenizer stories260k, {os.cpu_count()} CPUs"
        )
        rows = []
        for packing in ("zero_padding", "greedy"):
            rows.append(
                (
                    f"ftlab {packing}",
                    run_ftlab(tok, data_dir, packing, args.max_length, args.src_length),
                )
            )
            if not args.skip_paddlenlp:
                label = (
                    f"paddlenlp {'greedy' if packing == 'greedy' else 'zero_padding'} "
                    f"({args.paddlenlp_mask})"
                )
                rows.append(
                    (
                        label,
                        run_paddlenlp(
                            tok,
                            data_dir,
                            packing == "greedy",
                            args.max_length,
                            args.src_length,
                            args.paddlenlp_mask,
                        ),
                    )
                )
    print(
        f"{'pipeline':38s} {'seconds':>8s} {'examples/s':>11s} {'tokens/s':>11s} "
        f"{'packs':>7s} {'efficiency':>10s}"
    )
    for label, r in rows:
        print(
            f"{label:38s} {r['seconds']:8.2f} {r['examples'] / r['seconds']:11.0f} "
            f"{r['tokens'] / r['seconds']:11.0f} {r['packs']:7d} {r['efficiency']:10.4f}"
        )


if __name__ == "__main__":
    main()
