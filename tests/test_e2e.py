"""End to end: the real ``ftlab`` command on the shipped model leaves a complete run dir."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import (  # noqa: F401 (kept importable)
    FTLAB,
    read_jsonl,
    run_ftlab,
    run_ftlab_forked,
    run_in_process,
    run_predict,
)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("cwd")
    proc = run_ftlab_forked(
        cwd,
        "train.max_steps=12",
        "train.logging_steps=2",
        "train.save_steps=6",
        "eval.max_new_tokens=16",
        "train.report_to=[visualdl,tensorboard]",
    )
    runs = list((cwd / "outputs").glob("*/*_stories260k_lora"))
    assert len(runs) == 1, runs
    return cwd, runs[0], proc


def test_run_dir_is_complete(short_run) -> None:
    cwd, run_dir, _ = short_run
    # Nothing is written outside the run dir.
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "resolved_config.yaml",
        "environment.json",
        "data_fingerprints.json",
        "metrics.jsonl",
        "summary.json",
        "samples.jsonl",
        "final/ftlab_method.json",
        "final/lora_config.json",
        "final/peft_model.safetensors.index.json",
    ):
        assert (run_dir / name).is_file(), name
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-12", "checkpoint-6"]
    assert list((run_dir / "checkpoints/checkpoint-12").glob("*.safetensors"))
    # A private run dir (0700); RNG and scheduler state as JSON, not pickles.
    assert oct(run_dir.stat().st_mode & 0o777) == "0o700"
    names = {p.name for p in (run_dir / "checkpoints/checkpoint-12").iterdir()}
    assert {"rng_state.rank0.json", "scheduler.json"} <= names
    assert not [n for n in names if n.endswith((".pth", ".pdparams", ".pdopt"))], names


def test_train_log_splits_the_run_by_phase(short_run) -> None:
    """ftlab.record.phases: each phase of the run, once, in order (bench-startup's split)."""
    log = (short_run[1] / "train.log").read_text()
    found = re.findall(r"phase ([a-z ]+): ([\d.]+) s wall, ([\d.]+) s CPU", log)
    assert [name for name, _, _ in found] == [
        "data",
        "model load",
        "base eval",
        "trainer setup",
        "train",
        "tuned eval",
        "save",
    ]
    assert all(float(wall) >= 0 and float(cpu) >= 0 for _, wall, cpu in found)
    assert float(dict((n, c) for n, _, c in found)["train"]) > 0


def test_resolved_config_records_derived_values(short_run) -> None:
    from omegaconf import OmegaConf

    resolved = OmegaConf.load(short_run[1] / "resolved_config.yaml")
    derived = resolved.derived
    assert derived.data_parallel_degree == 1 and derived.world_size == 1
    assert derived.global_batch_size == 16
    assert derived.lora_alpha == 16.0
    assert derived.total_steps == 12
    assert derived.train_examples == 2000
    assert resolved.method.lora_rank == 8


def test_environment_record_has_versions_and_no_process_env(short_run) -> None:
    env = json.loads((short_run[1] / "environment.json").read_text())
    assert env["packages"]["paddlenlp"] == "3.0.0b4"
    assert env["command"][0] == "ftlab" and "train.max_steps=12" in env["command"]
    assert set(env["ftlab_git"]) == {"commit", "dirty"}
    text = json.dumps(env)
    assert "PATH" not in text and "HOME" not in text


def test_data_fingerprints(short_run) -> None:
    from ftlab.record.provenance import sha256_file

    prints = json.loads((short_run[1] / "data_fingerprints.json").read_text())
    assert len(prints) == 2
    for path, digest in prints.items():
        assert sha256_file(Path(path)) == digest


def test_metrics_loss_goes_down_and_throughput_is_positive(short_run) -> None:
    rows = [r for r in read_jsonl(short_run[1] / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for r in rows:
        assert r["tokens_per_second"] > 0 and r["effective_tokens_per_second"] > 0
        assert r["effective_tokens_per_second"] <= r["tokens_per_second"]
        assert r["peak_memory_mb"] > 100
    # Warmup then cosine decay: positive until the schedule reaches 0 at the last step.
    assert all(r["learning_rate"] > 0 for r in rows[:-1])
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.8


def test_summary_and_printed_report(short_run) -> None:
    _, run_dir, proc = short_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["eval_loss"] > 0 and summary["peak_memory_mb"] > 100
    assert summary["parameters"] == {"total": 306272, "trainable": 46240}
    assert 0 <= summary["entity_recall_base"] <= 1 and 0 <= summary["entity_recall"] <= 1
    assert str(run_dir) in proc.stdout and "tokens/s" in proc.stdout


def test_visualdl_logs_hold_the_same_scalars(short_run) -> None:
    from visualdl import LogReader

    logdir = short_run[1] / "visualdl"
    tags: dict[str, list] = {}
    for f in logdir.iterdir():
        reader = LogReader(file_path=str(f))
        for tag in reader.get_tags().get("scalar", []):
            tags.setdefault(tag, []).extend(reader.get_data("scalar", tag))
    for tag in (
        "train/loss",
        "train/tokens_per_second",
        "train/effective_tokens_per_second",
        "train/peak_memory_mb",
        "train/learning_rate",
        "final/eval_loss",
        "final/entity_recall",
        "final/bleu4",
        "final/rougel",
    ):
        assert tag in tags, (tag, sorted(tags))
    losses = [(p.id, p.value) for p in tags["train/loss"]]
    metrics = [r for r in read_jsonl(short_run[1] / "metrics.jsonl") if r["kind"] == "train"]
    assert [s for s, _ in losses] == [r["step"] for r in metrics]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in metrics], rel=1e-6)


def test_generation_metrics_and_predictions(short_run) -> None:
    """The demo task gains BLEU/ROUGE beside entity recall; predictions.jsonl holds every
    dev generation, and the summary's numbers are those of its texts."""
    from ftlab.evaluation.text_metrics import score_texts

    run_dir = short_run[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    gen = summary["generation"]
    assert (gen["units"], gen["records"]) == ("word", 48)
    rows = read_jsonl(run_dir / "predictions.jsonl")
    assert len(rows) == 48 and set(rows[0]) == {"src", "tgt", "output", "base_output"}
    refs = [r["tgt"] for r in rows]
    for key, texts in (("finetuned", "output"), ("base", "base_output")):
        again = score_texts([r[texts] for r in rows], refs, "word")
        assert gen[key]["bleu4"] == pytest.approx(again.bleu4, abs=1e-12)
        assert gen[key]["rougel"] == pytest.approx(again.rougel, abs=1e-12)
    assert "BLEU-4" in short_run[2].stdout
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_bleu4" in r]
    assert len(evals) == 1 and evals[0]["eval_rouge1_base"] == gen["base"]["rouge1"]


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every tensorboardX event file in ``logdir`` (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_holds_the_scalars_ftlab_adds(short_run) -> None:
    run_dir = short_run[1]
    tags = tensorboard_scalars(run_dir / "tensorboard")
    for tag in (
        "train/loss",
        "train/tokens_per_second",
        "train/padding_efficiency",
        "train/peak_memory_mb",
        "eval/bleu4",
        "final/eval_loss",
        "final/rougel",
    ):
        assert tag in tags, (tag, sorted(tags))
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [s for s, _ in tags["train/loss"]] == [r["step"] for r in train]
    assert [v for _, v in tags["train/loss"]] == pytest.approx([r["loss"] for r in train])
    assert list((run_dir / "visualdl").glob("vdlrecords.*"))  # and VisualDL as well
    assert not list((run_dir / "visualdl").glob("events.out.tfevents.*"))


def test_samples_show_base_and_finetuned_outputs(short_run) -> None:
    samples = read_jsonl(short_run[1] / "samples.jsonl")
    assert len(samples) == 5
    for s in samples:
        assert s["prompt"] and isinstance(s["base_output"], str)
        assert isinstance(s["finetuned_output"], str) and len(s["entities"]) == 3


def test_bf16_on_cpu_fails_before_heavy_work(tmp_path: Path) -> None:
    proc = run_ftlab(tmp_path, "precision=bf16", check=False)
    assert proc.returncode == 2
    assert "precision=bf16 (bfloat16): CPU runs compute in float32 only" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.fast
def test_unknown_key_fails_with_closest_names(tmp_path: Path) -> None:
    proc = run_ftlab(tmp_path, "method.lora_rnk=4", check=False)
    assert proc.returncode == 2
    assert "Closest valid keys: lora_rank" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.fast
def test_missing_model_fails_with_one_line(tmp_path: Path) -> None:
    proc = run_ftlab(tmp_path, "model.name_or_path=/nonexistent/llama", check=False)
    assert proc.returncode == 2
    assert "model.name_or_path='/nonexistent/llama': no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_run_lifts_entity_recall(tmp_path: Path) -> None:
    """The default ``ftlab`` run (LoRA) must visibly change behaviour: +30 points."""
    proc = run_ftlab(tmp_path, "hydra.run.dir=run")
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["entity_recall"] - summary["entity_recall_base"] >= 0.30, summary
    # What a new user reads: ftlab's own lines, at most ~40 besides the progress lines;
    # PaddleNLP's and Paddle's log, its argument dump included, is in train.log.
    console = (proc.stdout + proc.stderr).splitlines()
    progress = [x for x in console if x.startswith("step ")]
    assert len(progress) == 4 and len(console) - len(progress) <= 40, proc.stdout + proc.stderr
    for line in ("ftlab  model stories260k  method lora", "data   train 2,000 examples"):
        assert any(x.startswith(line) for x in console), line
    assert "eval   loss" in proc.stdout and "ftlab summary" in proc.stdout
    assert not proc.stderr and "PaddleNLP" not in proc.stdout and "Warning" not in proc.stdout
    log = (tmp_path / "run/train.log").read_text()
    assert "Training Configuration Arguments" in log and "[PaddleNLP][INFO]" in log
    assert "No ccache found" in log  # known noise: kept in the log, not shown


@pytest.mark.slow
def test_full_finetuning_lifts_entity_recall(tmp_path: Path) -> None:
    run_ftlab(tmp_path, "method=full", "hydra.run.dir=run")
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["parameters"]["trainable"] == 260032
    assert summary["entity_recall"] - summary["entity_recall_base"] >= 0.30, summary


def test_qlora_trains_on_cpu_with_ftlab_backend(tmp_path: Path) -> None:
    run_ftlab_forked(
        tmp_path,
        "method=qlora",
        "train.max_steps=10",
        "train.logging_steps=2",
        "eval.max_new_tokens=16",
        "hydra.run.dir=run",
    )
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["derived"]["quant_backend"] == "ftlab"
    # The nf4 base still counts: 260,032 base + 46,240 LoRA parameters.
    assert summary["parameters"] == {"total": 306272, "trainable": 46240}
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["entity_recall"] is not None
    for name in ("qlora_adapter.safetensors", "quant_config.json", "config.json"):
        assert (run_dir / "final" / name).is_file(), name
    quant = json.loads((run_dir / "final/quant_config.json").read_text())
    assert quant["algo"] == "nf4" and quant["block_size"] == 64
    assert len(quant["quantized_layers"]) == 35  # 7 linears x 5 layers


def test_predict_from_run_dir_and_from_base_plus_adapter(short_run, tmp_path: Path) -> None:
    _, run_dir, _ = short_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"src": "Write a short story about a dog named Max who finds a red ball."})
        + "\n"
        + json.dumps({"prompt": "Tell a story about a cat called Lily.", "id": 7})
        + "\n"
    )
    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_predict(
        str(run_dir),
        "--input",
        str(prompts),
        "--output",
        str(out_a),
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
    )
    # The same model from its two halves: ftlab-predict's main in this process (the command
    # itself ran just above).
    predict_here(
        "--base",
        str(_asset("stories260k")),
        "--adapter",
        str(run_dir / "final"),
        "--input",
        str(prompts),
        "--output",
        str(out_b),
        "--max-new-tokens",
        "12",
    )
    a, b = read_jsonl(out_a), read_jsonl(out_b)
    assert [r.get("id") for r in a] == [None, 7]  # input fields kept, order kept
    assert all(isinstance(r["output"], str) and r["output"] for r in a)
    assert [r["output"] for r in a] == [r["output"] for r in b]  # greedy, same model
    # Sampling with a seed is reproducible: in a new process and in this one.
    outs = []
    for name, run in (("s1.jsonl", run_predict), ("s2.jsonl", predict_here)):
        run(
            str(run_dir),
            "--input",
            str(prompts),
            "--output",
            str(tmp_path / name),
            "--strategy",
            "sampling",
            "--top-k",
            "20",
            "--top-p",
            "0.9",
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--max-new-tokens",
            "12",
        )
        outs.append([r["output"] for r in read_jsonl(tmp_path / name)])
    assert outs[0] == outs[1]


def predict_here(*args: str) -> None:
    assert run_in_process("ftlab-predict", *args) == 0


def test_predict_reports_a_broken_prompt_file(short_run, tmp_path: Path) -> None:
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"src": "ok"}\n{not json\n')
    proc = run_predict(
        str(short_run[1]),
        "--input",
        str(prompts),
        "--output",
        str(tmp_path / "o.jsonl"),
        check=False,
    )
    assert proc.returncode == 2
    assert f"{prompts}:2: not valid JSON" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def _asset(name: str) -> Path:
    from ftlab.assets import asset_path

    return asset_path(name)
