"""ftlab's overhead: the same training work as ``ftlab`` and as a plain PaddleNLP script.

Pairs, each run as whole processes alternating A B A B (``--repeats``, median reported):

  sft  ``ftlab`` (LoRA on the shipped stories260K, the demo stories, its defaults) vs a
       plain script that builds PaddleNLP's ``SFTTrainer`` as ``llm/run_finetune.py`` does:
       ``[bos] + src + tgt + [eos]`` examples shifted by one (labels -100 on the prompt),
       ``DataCollatorForSeq2Seq``, ``LoRAModel`` on the same seven projections (rank 8,
       alpha 16), the same optimizer, schedule, batch, steps, seed, one checkpoint and the
       final adapter at the end, and the dev loss once at the end.
  dpo  ``ftlab stage=dpo data.packing=zero_padding`` (LoRA, the demo preference pairs) vs
       PaddleNLP's ``DPOTrainer`` fed as ``llm/alignment/dpo/run_dpo.py`` feeds it
       (``preprocess_preference_data``, ``ZeroPaddingMapDataset`` rows of 256 tokens,
       ``preference_collate_fn``), the reference being the adapter switched off (no dev
       evaluation: ``DPOTrainer.evaluate`` fails in a plain CPU process; ftlab's run
       evaluates the dev pairs, which its whole-process figures include).

Both sides run with Paddle's CPU defaults (``launch.cpu_fast_path=false
launch.cpu_threads=1`` for ftlab), so the ratio is ftlab's own cost; the ``fast path`` row
shows ftlab's default CPU settings on the same work. ``eval metrics off`` is the
comparison the overhead target is about (``eval.generation=false eval.demo_metric=false``);
the optional features' rows add one feature each to that ftlab run: generation metrics
(BLEU/ROUGE + entity recall, base and tuned), the progress bar (under a pseudo-terminal,
where ftlab draws it), and trackers (``train.report_to=[visualdl]`` vs ``[]``; the
plain script never writes VisualDL logs in the compared pair).

Figures per process: CPU seconds (user + system, from ``wait4``), wall seconds, peak RSS,
and the steady-state step time (median ``interval_runtime`` of logging steps after the
first three, PaddleNLP's own per-step timer, the same in both). Both sides train on the
same encoded examples in the same batches, in the same order (the plain side draws them
with ftlab's ``GlobalBatchSampler``, the only ftlab piece in it): the SFT rows' first and
last losses, printed for every row, are equal, and each step pads to the same length on
both sides. DPO's plain collator pads a batch to its longest row, as ftlab's does, instead
of to 256, but its pairs are not the same batch for batch (the first step's chosen
log-probabilities differ: the two pipelines encode or order the pairs differently), so its
step ratio compares similar, not identical, work.

    .venv/bin/python bench/overhead.py                     # sft + dpo, 3 repeats, 40 steps
    .venv/bin/python bench/overhead.py --only sft --repeats 5 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FTLAB = Path(sys.executable).parent / "ftlab"
PAIR_STEPS = {"sft": 40, "dpo": 30}
WARMUP_STEPS = 3
# Paddle's CPU defaults: MKL's vendor-chosen kernels, one math thread per process.
PLAIN_CPU = ["launch.cpu_fast_path=false", "launch.cpu_threads=1"]
NO_EVAL_METRICS = ["eval.generation=false", "eval.demo_metric=false"]


# --------------------------------------------------------------------------- plain side


def _log_callback(path: Path) -> Any:
    from paddlenlp.trainer import TrainerCallback

    class JsonLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonLog()


def _lora(model: Any) -> Any:
    from paddlenlp.peft import LoRAConfig, LoRAModel

    targets = [f".*{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    targets = [t.replace(".*", ".*self_attn.") for t in targets] + [
        f".*mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")
    ]
    config = LoRAConfig(
        target_modules=targets, r=8, lora_alpha=16, lora_dropout=0.0, dtype="float32"
    )
    model = LoRAModel(model, config)
    model.mark_only_lora_as_trainable()
    return model


def _model_and_tokenizer() -> tuple[Any, Any]:
    from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(REPO / "ftlab" / "assets" / "stories260k")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = "<unk>"  # a bare sentencepiece tokenizer has none (as ftlab's demo)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return model, tok


def _arguments(cls: Any, out: Path, steps: int, batch: int, lr: float, warmup: int) -> Any:
    return cls(
        output_dir=str(out / "checkpoints"),
        do_train=True,
        max_steps=steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=32,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        max_grad_norm=1.0,
        seed=42,
        logging_steps=1,
        save_strategy="steps",
        save_steps=steps,
        unified_checkpoint=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        report_to=[],
    )


def _in_ftlab_order(trainer_cls: Any) -> Any:
    """``trainer_cls`` drawing its batches as ftlab's trainer does (``GlobalBatchSampler``:
    the same seeded order), so both sides train on the same batch at every step and their
    steps pad to the same length: the only ftlab piece on the plain side. Without it the
    two orders differ and the steady-step ratio swings by about +-10% between rows that do
    the same work (a 20-step run; measured)."""
    from ftlab.distributed.batching import GlobalBatchSampler

    class InFtlabOrder(trainer_cls):
        def _get_train_sampler(self) -> Any:
            return GlobalBatchSampler(
                self.train_dataset, self.args.per_device_train_batch_size, seed=self.args.seed
            )

    return InFtlabOrder


def plain_sft(out: Path, steps: int) -> None:
    """As ``llm/run_finetune.py`` builds it (the wheel lacks its ``convert_example_common``,
    restated here: src then tgt, prompt labels -100, shifted by one)."""
    from paddlenlp.data import DataCollatorForSeq2Seq
    from paddlenlp.datasets import MapDataset
    from paddlenlp.trl import SFTConfig, SFTTrainer

    model, tok = _model_and_tokenizer()
    model = _lora(model)

    def encode(record: dict[str, Any]) -> dict[str, list[int]]:
        src = tok(record["src"], add_special_tokens=False)["input_ids"][:64]
        tgt = tok(record["tgt"], add_special_tokens=False)["input_ids"]
        ids = [tok.bos_token_id, *src, *tgt, tok.eos_token_id][:192]
        labels = [-100] * (1 + len(src)) + ids[1 + len(src) :]
        return {"input_ids": ids[:-1], "labels": labels[1:]}

    def rows(split: str) -> MapDataset:
        lines = (REPO / "ftlab/assets/demo_stories" / f"{split}.json").read_text().splitlines()
        return MapDataset([encode(json.loads(line)) for line in lines if line.strip()])

    args = _arguments(SFTConfig, out, steps, batch=16, lr=1e-2, warmup=5)
    trainer = _in_ftlab_order(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=rows("train"),
        eval_dataset=rows("dev"),
        tokenizer=tok,
        data_collator=DataCollatorForSeq2Seq(tokenizer=tok, padding=True, label_pad_token_id=-100),
        callbacks=[_log_callback(out / "log.jsonl")],
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    trainer.log(trainer.evaluate())


def plain_dpo(out: Path, steps: int) -> None:
    """As ``llm/alignment/dpo/run_dpo.py`` feeds PaddleNLP's DPOTrainer (LoRA: the reference
    is the policy with its adapter off, ``dpo_config.lora``)."""
    from functools import partial
    from types import SimpleNamespace

    from paddlenlp.datasets import MapDataset, ZeroPaddingMapDataset
    from paddlenlp.trl import DPOTrainer, preference_collate_fn, preprocess_preference_data
    from paddlenlp.trl import SFTConfig as Config

    from ftlab.stages.trainers import PaddleDPOConfig  # upstream's DPOConfig is not in the wheel

    model, tok = _model_and_tokenizer()
    model = _lora(model)
    tok.chat_template = None  # as run_dpo.py
    data_args = SimpleNamespace(max_seq_len=256, max_prompt_len=64)
    model_args = SimpleNamespace(flash_mask=False)
    encode = partial(
        preprocess_preference_data, tokenizer=tok, data_args=data_args, model_args=model_args
    )

    def rows(split: str) -> ZeroPaddingMapDataset:
        lines = (REPO / "ftlab/assets/demo_preferences" / f"{split}.json").read_text()
        pairs = MapDataset([encode(json.loads(line)) for line in lines.splitlines() if line])
        # run_dpo.py always packs pairs into rows of max_seq_len (its collator needs them).
        return ZeroPaddingMapDataset(pairs, tokenizer=tok, max_length=256)

    def collate_to_longest(rows: list[dict[str, Any]]) -> dict[str, Any]:
        # run_dpo.py pads every row to max_seq_len; ftlab pads a batch to its longest row.
        # The same collator, told the batch's longest row, does ftlab's padding.
        longest = max(len(row["input_ids"]) for row in rows)
        return preference_collate_fn(rows, max_seq_len=longest)

    args = _arguments(Config, out, steps, batch=8, lr=3e-4, warmup=5)
    config = PaddleDPOConfig(beta=0.5, loss_type="sigmoid", lora=True)
    trainer = _in_ftlab_order(DPOTrainer)(
        model=model,
        ref_model=None,
        dpo_config=config,
        args=args,
        train_dataset=rows("train"),
        tokenizer=tok,
        data_collator=collate_to_longest,
        callbacks=[_log_callback(out / "log.jsonl")],
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    # No dev evaluation: DPOTrainer.evaluate fails in a plain CPU process (fleet's
    # distributed_model without fleet.init: no _user_defined_strategy); ftlab's run does
    # evaluate the dev pairs, so the DPO rows' whole-process figures include that.


# --------------------------------------------------------------------------- measuring


def measure(cmd: list[str], *, tty: bool = False) -> dict[str, float]:
    """Run one whole process; its own CPU time and peak RSS come from ``wait4``."""
    if tty:  # ftlab draws its progress bar only on a terminal
        cmd = ["script", "-qfec", shlex.join(cmd), "/dev/null"]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    output = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    return {
        "cpu": usage.ru_utime + usage.ru_stime,
        "wall": wall,
        "rss_mib": usage.ru_maxrss / 1024,  # of the process itself (script: its largest child)
    }


def step_figures(rows: list[dict[str, Any]]) -> tuple[float, tuple[float, float]]:
    """(median steady-state step seconds, (first, last) loss) from per-step log rows."""
    train = [r for r in rows if "loss" in r and "interval_runtime" in r]
    steady = [r["interval_runtime"] for r in train if r["step"] > WARMUP_STEPS]
    return statistics.median(steady), (train[0]["loss"], train[-1]["loss"])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_ftlab(pair: str, work: Path, steps: int, extra: list[str], tty: bool = False) -> dict:
    run_dir = work / f"ftlab-{time.monotonic_ns()}"
    # run_dpo.py packs pairs into rows of 256 tokens; ftlab does the same work when asked.
    stage = ["stage=dpo", "data.packing=zero_padding"] if pair == "dpo" else []
    cmd = [str(FTLAB), *stage, f"train.max_steps={steps}", "train.logging_steps=1"]
    cmd += [*extra, f"hydra.run.dir={run_dir}"]
    figures = measure(cmd, tty=tty)
    figures["step"], figures["losses"] = step_figures(read_jsonl(run_dir / "metrics.jsonl"))
    return figures


def run_plain(pair: str, work: Path, steps: int) -> dict:
    out = work / f"plain-{time.monotonic_ns()}"
    out.mkdir()
    cmd = [sys.executable, __file__, "--child", pair, "--out", str(out), "--steps", str(steps)]
    figures = measure(cmd)
    figures["step"], figures["losses"] = step_figures(read_jsonl(out / "log.jsonl"))
    return figures


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def compare(label: str, a: list[dict], b: list[dict]) -> str:
    """One table row: medians of A, ratios A / B."""
    ratio = {k: median(a, k) / median(b, k) for k in ("cpu", "wall", "step", "rss_mib")}
    return (
        f"| {label} | {median(a, 'cpu'):.1f} / {median(b, 'cpu'):.1f} | {ratio['cpu']:.3f} "
        f"| {median(a, 'wall'):.1f} / {median(b, 'wall'):.1f} | {ratio['wall']:.3f} "
        f"| {median(a, 'step'):.3f} / {median(b, 'step'):.3f} | {ratio['step']:.3f} "
        f"| {median(a, 'rss_mib'):.0f} / {median(b, 'rss_mib'):.0f} | {ratio['rss_mib']:.3f} |"
    )


HEADER = (
    "| ftlab vs plain PaddleNLP | CPU s | ratio | wall s | ratio | step s (steady) | ratio "
    "| peak RSS MiB | ratio |\n|---|---|---|---|---|---|---|---|---|"
)


def bench_pair(pair: str, repeats: int, steps: int, work: Path) -> list[str]:
    base = [*PLAIN_CPU, *NO_EVAL_METRICS, "train.report_to=[]"]
    variants: dict[str, tuple[list[str], bool]] = {
        "eval metrics off": (base, False),
        "+ trackers (visualdl)": ([*PLAIN_CPU, *NO_EVAL_METRICS], False),
        "+ progress bar (terminal)": (base, True),
        "fast path (ftlab's CPU defaults)": ([*NO_EVAL_METRICS, "train.report_to=[]"], False),
    }
    if pair == "sft":
        variants["+ generation metrics"] = ([*PLAIN_CPU, "train.report_to=[]"], False)
    else:  # the console, trackers and CPU settings are the stage's business no more than SFT's
        del variants["+ progress bar (terminal)"], variants["fast path (ftlab's CPU defaults)"]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    plain: list[dict] = []
    for i in range(repeats):  # A B A B: each variant beside a plain run of the same round
        for name, (extra, tty) in variants.items():
            results[name].append(run_ftlab(pair, work, steps, extra, tty))
            print(f"  {pair} round {i + 1}: {name}: {results[name][-1]}", flush=True)
        plain.append(run_plain(pair, work, steps))
        print(f"  {pair} round {i + 1}: plain: {plain[-1]}", flush=True)
    lines = [compare(f"{pair}: {name}", rows, plain) for name, rows in results.items()]
    # The same batches in the same order: the same losses, step for step (the fast path's
    # row differs in the last digits: MKL's other kernels and the heads-first attention).
    losses = {name: rows[0]["losses"] for name, rows in results.items()}
    lines.append(
        f"\n{pair} first / last losses: plain {plain[0]['losses'][0]:.6f} / "
        f"{plain[0]['losses'][1]:.6f}; "
        + ", ".join(f"{k} {a:.6f} / {b:.6f}" for k, (a, b) in losses.items())
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(PAIR_STEPS), default=["sft", "dpo"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, help="steps per run (default: sft 40, dpo 30)")
    parser.add_argument("--child", choices=sorted(PAIR_STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        {"sft": plain_sft, "dpo": plain_dpo}[args.child](args.out, args.steps)
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    load = os.getloadavg()[0]
    print(f"load average before: {load:.2f} on {os.cpu_count()} cores", flush=True)
    lines = [HEADER]
    with tempfile.TemporaryDirectory(prefix="ftlab-overhead-") as tmp:
        for pair in args.only:
            steps = args.steps or PAIR_STEPS[pair]
            lines += bench_pair(pair, args.repeats, steps, Path(tmp))
    print(f"\nmedians of {args.repeats}, A B alternating; ratio = ftlab / plain")
    print("\n".join(lines))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
