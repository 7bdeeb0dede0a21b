"""Can fine-tuning visibly move stories260K on the demo task within seconds on a CPU?

Measures greedy entity recall on the demo dev set for the base model, then fine-tunes with
plain PaddleNLP (no ftlab trainer) and measures it again, for LoRA on every linear layer
and for full fine-tuning (``--method`` picks one or both). The aim is a lift of at least 30
points within ~25-30 s of training on 2 cores, so the shipped default run shows the
effect. Not part of the test suite.

    .venv/bin/python bench/demo_feasibility.py                  # LoRA and full FT
    .venv/bin/python bench/demo_feasibility.py --method lora --steps 60 --lr 3e-3
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()

import paddle  # noqa: E402
from paddlenlp.peft import LoRAConfig, LoRAModel  # noqa: E402
from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ftlab.evaluation import EntityRecall, entity_recall  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "ftlab" / "assets" / "stories260k"
DATA_DIR = ROOT / "ftlab" / "assets" / "demo_stories"
LORA_TARGETS = [f".*{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f".*{m}" for m in ("gate_proj", "up_proj", "down_proj")
]
IGNORE = -100


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def encode_example(tok: Any, record: dict[str, Any], max_length: int) -> tuple[list, list]:
    """Training pair as the pipeline builds it: labels are the inputs shifted by one.

    seq = [bos] + src + tgt + [eos]; input_ids = seq[:-1]; labels = seq[1:] with the
    prompt positions set to IGNORE (PaddleNLP's causal-LM loss does not shift).
    """
    src = tok(record["src"], add_special_tokens=False)["input_ids"]
    tgt = tok(record["tgt"], add_special_tokens=False)["input_ids"]
    seq = ([tok.bos_token_id, *src, *tgt, tok.eos_token_id])[: max_length + 1]
    labels = [IGNORE] * len(src) + seq[len(src) + 1 :]
    return seq[:-1], labels


def batches(examples: list, batch_size: int, pad_id: int, seed: int):
    """Endless shuffled batches, right-padded (causal attention never looks right)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = [x + [pad_id] * (width - len(x)) for x, _ in chunk]
            labels = [y + [IGNORE] * (width - len(y)) for _, y in chunk]
            yield paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(labels, dtype="int64")


def train(model: Any, examples: list, args: argparse.Namespace, lr: float, pad_id: int) -> dict:
    params = [p for p in model.parameters() if not p.stop_gradient]
    sched = paddle.optimizer.lr.LinearWarmup(
        paddle.optimizer.lr.CosineAnnealingDecay(lr, T_max=args.steps - args.warmup),
        warmup_steps=args.warmup,
        start_lr=0.0,
        end_lr=lr,
    )
    opt = paddle.optimizer.AdamW(
        learning_rate=sched,
        parameters=params,
        weight_decay=0.0,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
    )
    model.train()
    losses, t0 = [], time.perf_counter()
    stream = batches(examples, args.batch_size, pad_id, args.seed)
    for step in range(1, args.steps + 1):
        ids, labels = next(stream)
        loss = model(input_ids=ids, labels=labels)[0]
        loss.backward()
        opt.step()
        opt.clear_grad()
        sched.step()
        losses.append(float(loss))
        if step % 10 == 0 or step == 1:
            print(f"  step {step:4d}  loss {losses[-1]:.3f}  {time.perf_counter() - t0:5.1f}s")
    n_params = sum(math.prod(p.shape) for p in params)
    return {"train_s": time.perf_counter() - t0, "final_loss": losses[-1], "params": n_params}


def evaluate(
    model: Any, tok: Any, dev: list, args: argparse.Namespace
) -> tuple[EntityRecall, float]:
    t0 = time.perf_counter()
    result = entity_recall(
        model, tok, dev, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size
    )
    return result, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["lora", "full", "both"], default="both")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2, help="LoRA learning rate")
    p.add_argument("--full-lr", type=float, default=3e-3, help="full fine-tuning learning rate")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-batch-size", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--samples", type=int, default=3)
    args = p.parse_args()
    print(f"imports: {time.perf_counter() - T0:.1f}s")

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    if tok.pad_token_id is None:
        raise SystemExit(f"{MODEL_DIR}: tokenizer has no pad token; the demo needs one")
    train_records = read_jsonl(DATA_DIR / "train.json")
    dev = read_jsonl(DATA_DIR / "dev.json")
    examples = [encode_example(tok, r, args.max_length) for r in train_records]
    print(f"train {len(examples)} examples, longest {max(len(x) for x, _ in examples)} tokens")

    def load() -> Any:
        paddle.seed(args.seed)
        return AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype="float32")

    base, eval_s = evaluate(load(), tok, dev, args)
    print(f"base recall {base.score:.3f} ({base.n_hits}/{base.n_entities})  eval {eval_s:.1f}s")
    report: dict[str, Any] = {"base": base.score}
    tuned: dict[str, EntityRecall] = {}

    if args.method in ("lora", "both"):
        config = LoRAConfig(
            target_modules=LORA_TARGETS, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0
        )
        model = LoRAModel(load(), config)
        model.mark_only_lora_as_trainable()
        print(f"LoRA r={args.rank} lr={args.lr}, {args.steps} steps of {args.batch_size}")
        stats = train(model, examples, args, args.lr, tok.pad_token_id)
        tuned["lora"], eval_s = evaluate(model, tok, dev, args)
        report["lora"] = {**stats, "recall": tuned["lora"].score, "eval_s": eval_s}
        print(f"LoRA recall {tuned['lora'].score:.3f}  train {stats['train_s']:.1f}s")

    if args.method in ("full", "both"):
        model = load()
        print(f"full FT lr={args.full_lr}, {args.steps} steps of {args.batch_size}")
        stats = train(model, examples, args, args.full_lr, tok.pad_token_id)
        tuned["full"], eval_s = evaluate(model, tok, dev, args)
        report["full"] = {**stats, "recall": tuned["full"].score, "eval_s": eval_s}
        print(f"full recall {tuned['full'].score:.3f}  train {stats['train_s']:.1f}s")

    for i in range(min(args.samples, base.n_records)):
        print(f"\n--- {base.records[i].prompt}\n  base: {base.records[i].output!r}")
        for name, result in tuned.items():
            print(f"  {name}: {result.records[i].output!r}")
    report["total_s"] = time.perf_counter() - T0
    print("\n" + json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
