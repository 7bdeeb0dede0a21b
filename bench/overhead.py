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
       ``preference_collate_fn``), the reference being the adapter switched off, and the
       dev pairs evaluated at the end on both sides.

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
first three, PaddleNLP's own per-step timer, the same in both).

The same work, shown by the losses printed under the table (every step of the first
round, the largest difference per row, the dev loss). Both sides train on the same
encoded examples in the same batches, in the same order, from the same initial adapter:

* The plain side draws its batches with ftlab's ``GlobalBatchSampler`` (the sampler is the
  only ftlab piece in it; DPO also reads its pairs in ftlab's seeded packing order,
  ``ftlab.data.packing.pack_order``, so PaddleNLP's packer makes ftlab's packs), and
  seeds before building the model, as ``run_dpo.py`` and ftlab (``train.seed``) do
  (``run_finetune.py`` does not: its LoRA init differs from run to run).
* Where ftlab differs from the upstream scripts on purpose, the plain side takes ftlab's
  setting: DPO's log-probs sum over every response token (``ignore_eos_token=False``;
  ``run_dpo.py`` passes True, ``ftlab/stages/dpo.py`` says why), and the DPO collator pads
  a batch to its longest row instead of to 256. The plain DPO trainer skips the fleet
  wrapper at evaluation in one process, which ``DPOTrainer.evaluate`` otherwise fails on
  (ftlab's trainer does the same; ``_evaluating_in_one_process``).
* What stays the upstream way: ``DataCollatorForSeq2Seq`` pads SFT batches on the left
  (the Llama tokenizer's side), ftlab on the right. With rotary positions and the pads
  masked this is the same arithmetic in another rounding: the SFT losses agree to 4e-6
  over 20 steps (the plain side padded on the right makes them bit-equal; measured), the
  DPO losses and dev losses are bit-equal. Shapes and work per step are the same.

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
SEED = 42  # ftlab's train.seed
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
    from paddlenlp.trainer import set_seed
    from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

    # Seeded before the model and its adapter exist, as run_dpo.py does and as ftlab does
    # (train.seed): LoRA's A matrices are drawn at random. run_finetune.py seeds only in
    # the Trainer, after its model is built, so its adapter starts differently on every
    # run: unseeded here, step 3's loss was 1.7728, 1.7784 and 1.7763 on three runs of the
    # same work (ftlab: 1.7851 every time), and the sides parted from step 3 on.
    set_seed(SEED)
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
        seed=SEED,
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
    trainer.evaluate()  # logs its metrics (the dev loss) itself


def _evaluating_in_one_process(trainer_cls: Any) -> Any:
    """``trainer_cls`` whose ``evaluate`` runs in one process: the least change that lets
    the plain side evaluate the dev pairs, as ftlab's run does (so both whole processes
    do the same work). PaddleNLP's ``DPOTrainer.evaluate`` wraps the model with
    ``fleet.distributed_model``, which fails without ``fleet.init`` (no
    ``_user_defined_strategy``) and, on one process, with it too (paddle 3.3.1: its
    ``NoPipelineParallel`` asserts a pipeline model). One process needs no wrapper; the
    AMP decoration it also skips does nothing in float32."""

    class OneProcess(trainer_cls):
        def _wrap_ref_model(self, model: Any) -> Any:
            return super()._wrap_ref_model(model) if self.args.world_size > 1 else model

    return OneProcess


def plain_dpo(out: Path, steps: int) -> None:
    """As ``llm/alignment/dpo/run_dpo.py`` feeds PaddleNLP's DPOTrainer (LoRA: the reference
    is the policy with its adapter off, ``dpo_config.lora``), train pairs in ftlab's
    packing order, and the dev pairs evaluated at the end, as run_dpo.py does."""
    from functools import partial
    from types import SimpleNamespace

    from paddlenlp.datasets import MapDataset, ZeroPaddingMapDataset
    from paddlenlp.trl import DPOTrainer, preference_collate_fn, preprocess_preference_data
    from paddlenlp.trl import SFTConfig as Config

    from ftlab.data.packing import pack_order
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
        pairs = [encode(json.loads(line)) for line in lines.splitlines() if line.strip()]
        if split == "train":
            # ftlab packs its pairs in a seeded order (data.shuffle: a pack mixes pairs
            # from all over the file); run_dpo.py packs the file's order. The same order
            # gives PaddleNLP's sequential packer ftlab's packs (the same sequential
            # algorithm, tested in ftlab), so the sampler draws the same batches.
            pairs = [pairs[i] for i in pack_order(len(pairs), SEED, shuffle=True)]
        # run_dpo.py always packs pairs into rows of max_seq_len (its collator needs them).
        return ZeroPaddingMapDataset(MapDataset(pairs), tokenizer=tok, max_length=256)

    def collate_to_longest(rows: list[dict[str, Any]]) -> dict[str, Any]:
        # run_dpo.py pads every row to max_seq_len; ftlab pads a batch to its longest row.
        # The same collator, told the batch's longest row, does ftlab's padding.
        longest = max(len(row["input_ids"]) for row in rows)
        return preference_collate_fn(rows, max_seq_len=longest)

    args = _arguments(Config, out, steps, batch=8, lr=3e-4, warmup=5)
    config = PaddleDPOConfig(beta=0.5, loss_type="sigmoid", lora=True)
    trainer = _in_ftlab_order(_evaluating_in_one_process(DPOTrainer))(
        model=model,
        ref_model=None,
        dpo_config=config,
        args=args,
        train_dataset=rows("train"),
        eval_dataset=rows("dev"),
        tokenizer=tok,
        data_collator=collate_to_longest,
        callbacks=[_log_callback(out / "log.jsonl")],
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    trainer.evaluate()  # logs its metrics (the dev loss) itself


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


def step_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median steady-state step seconds, every step's loss and the dev loss at the end
    (None without one) from a run's log rows."""
    train = [r for r in rows if "loss" in r and "interval_runtime" in r]
    steady = [r["interval_runtime"] for r in train if r["step"] > WARMUP_STEPS]
    dev = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {
        "step": statistics.median(steady),
        "losses": [r["loss"] for r in train],
        "dev_loss": dev[-1] if dev else None,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_ftlab(pair: str, work: Path, steps: int, extra: list[str], tty: bool = False) -> dict:
    run_dir = work / f"ftlab-{time.monotonic_ns()}"
    # run_dpo.py packs pairs into rows of 256 tokens; ftlab does the same work when asked.
    stage = ["stage=dpo", "data.packing=zero_padding"] if pair == "dpo" else []
    cmd = [str(FTLAB), *stage, f"train.max_steps={steps}", "train.logging_steps=1"]
    cmd += [*extra, f"hydra.run.dir={run_dir}"]
    figures = measure(cmd, tty=tty)
    return {**figures, **step_figures(read_jsonl(run_dir / "metrics.jsonl"))}


def run_plain(pair: str, work: Path, steps: int) -> dict:
    out = work / f"plain-{time.monotonic_ns()}"
    out.mkdir()
    cmd = [sys.executable, __file__, "--child", pair, "--out", str(out), "--steps", str(steps)]
    figures = measure(cmd)
    return {**figures, **step_figures(read_jsonl(out / "log.jsonl"))}


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


def bench_pair(pair: str, repeats: int, steps: int, work: Path) -> tuple[list[str], list[str]]:
    """The pair's table rows, and the lines that show both sides did the same work."""
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
            print(f"  {pair} round {i + 1}: {name}: {timings(results[name][-1])}", flush=True)
        plain.append(run_plain(pair, work, steps))
        print(f"  {pair} round {i + 1}: plain: {timings(plain[-1])}", flush=True)
    table = [compare(f"{pair}: {name}", rows, plain) for name, rows in results.items()]
    return table, same_work(pair, plain[0], {name: rows[0] for name, rows in results.items()})


def timings(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k} {figures[k]:.3f}" for k in ("cpu", "wall", "step", "rss_mib"))


def same_work(pair: str, plain: dict[str, Any], ftlab: dict[str, dict[str, Any]]) -> list[str]:
    """Every step's loss of the plain run beside the first ftlab row's, and per row the
    largest difference and the dev loss: the evidence that both sides did the same work."""
    first = next(iter(ftlab))
    lines = [f"\n{pair} loss per step: plain / ftlab ({first})"]
    for step, (a, b) in enumerate(zip(plain["losses"], ftlab[first]["losses"], strict=True), 1):
        lines.append(f"  {step:3d}  {a:.6f}  {b:.6f}")
    steps = len(plain["losses"])
    lines.append(f"{pair} largest |ftlab - plain| loss over {steps} steps, dev loss:")
    lines.append(f"  plain: dev {plain['dev_loss']:.6f}")
    for name, figures in ftlab.items():
        pairs = zip(plain["losses"], figures["losses"], strict=True)
        worst = max(abs(a - b) for a, b in pairs)
        lines.append(f"  {name}: {worst:.1e}, dev {figures['dev_loss']:.6f}")
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
    table, evidence = [HEADER], []
    with tempfile.TemporaryDirectory(prefix="ftlab-overhead-") as tmp:
        for pair in args.only:
            steps = args.steps or PAIR_STEPS[pair]
            rows, same = bench_pair(pair, args.repeats, steps, Path(tmp))
            table, evidence = table + rows, evidence + same
    print(f"\nmedians of {args.repeats}, A B alternating; ratio = ftlab / plain")
    print("\n".join(table + evidence))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
