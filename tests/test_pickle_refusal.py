"""No code runs from a pickle planted in a run or model directory (issue 31's red team).

"The pickle" is a dict whose value's ``__reduce__`` creates a marker file when unpickled.
It is planted in each place the red team found one read; every command must fail with one
line naming the file and ``model.allow_pickle=true``, and the marker must never appear.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import run_ftlab_forked, without_paddle_vars
from test_e2e import FTLAB

from ftlab.assets import asset_path
from ftlab.errors import ModelLoadError
from ftlab.models.weights import changed_weights, pickled_weights, refuse_pickles

TINY = ("train.max_steps=2", "eval.max_new_tokens=4", "eval.num_samples=2")


class Plant:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> Path:
    """The pickle at ``path``: unpickling it creates ``marker``."""
    path.write_bytes(pickle.dumps({"weight": Plant(marker)}))
    return path


def test_the_plant_runs_code_when_unpickled(tmp_path):
    """The fixture itself: without the refusal, reading the file does run the code."""
    marker = tmp_path / "marker"
    pickle.loads(plant(tmp_path / "x.pdparams", marker).read_bytes())
    assert marker.exists()


def test_refuse_pickles_names_the_file_and_the_switch(tmp_path):
    (tmp_path / "training_args.bin").write_bytes(b"never read")  # PaddleNLP's, not weights
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert pickled_weights(tmp_path) == []
    refuse_pickles(tmp_path, allow_pickle=False)
    plant(tmp_path / "model_state.pdparams", tmp_path / "marker")
    with pytest.raises(ModelLoadError, match=r"model_state\.pdparams: a pickle.*allow_pickle=true"):
        refuse_pickles(tmp_path, allow_pickle=False)  # beside safetensors too
    refuse_pickles(tmp_path, allow_pickle=True)
    assert not (tmp_path / "marker").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished LoRA run and a finished full fine-tuning run (two steps each; no
    generation or demo metric: only their saved weights and records are read here)."""
    cwd = tmp_path_factory.mktemp("runs")
    out = {}
    no_eval = ("eval.generation=false", "eval.demo_metric=false")
    for method in ("lora", "full"):
        run_ftlab_forked(cwd, f"method={method}", *TINY, *no_eval, f"hydra.run.dir={method}")
        out[method] = cwd / method
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def lora_without_adapter(runs, tmp_path, marker) -> Path:
    run = copy_run(runs["lora"], tmp_path / "run")
    for f in (run / "final").glob("peft_model*"):
        f.unlink()
    plant(run / "final" / "lora_model_state.pdparams", marker)
    return run


def pickled_model_dir(path: Path, marker: Path) -> Path:
    """The shipped model's config and tokenizer, weights as a pickle only."""
    shutil.copytree(asset_path("stories260k"), path)
    (path / "model.safetensors").unlink()
    plant(path / "model_state.pdparams", marker)
    return path


def run_with_base(runs, tmp_path, marker, key: str) -> Path:
    """A LoRA run whose resolved config points (model.name_or_path, or the init model of
    an init_from run) at a directory holding a pickle."""
    run = copy_run(runs["lora"], tmp_path / "run")
    base = pickled_model_dir(run / "init_model" if key == "init" else tmp_path / "base", marker)
    path = run / "resolved_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    if key == "init":
        cfg["derived"]["init_model"] = str(base)
    else:
        cfg["model"]["name_or_path"] = str(base)
    path.write_text(yaml.safe_dump(cfg))
    return run


def predict(run: Path, tmp_path: Path) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"src": "Write a story about a cat."}\n')
    return ["ftlab-predict", str(run), "--input", str(prompts), "--output", str(tmp_path / "o")]


def setup_case(case: str, runs, tmp_path: Path, marker: Path) -> tuple[list[str], str]:
    """(command, the planted file's name) for one place the red team planted the pickle."""
    if case in ("lora-final/predict", "lora-final/merge", "lora-final/init_from"):
        run = lora_without_adapter(runs, tmp_path, marker)
        name = "lora_model_state.pdparams"
        if case.endswith("predict"):
            return predict(run, tmp_path), name
        if case.endswith("merge"):
            return ["ftlab-merge", str(run), "--out", str(tmp_path / "merged")], name
        return ["ftlab", "stage=dpo", "data=demo_preferences", f"init_from={run}", *TINY], name
    if case == "full-final/predict":
        run = copy_run(runs["full"], tmp_path / "run")
        for f in (run / "final").glob("model*.safetensors*"):
            f.unlink()
        plant(run / "final" / "model_state.pdparams", marker)
        return predict(run, tmp_path), "model_state.pdparams"
    if case in ("init_model/predict", "recorded-base/merge"):
        run = run_with_base(runs, tmp_path, marker, "init" if case.startswith("init") else "base")
        if case.endswith("predict"):
            return predict(run, tmp_path), "model_state.pdparams"
        return ["ftlab-merge", str(run), "--out", str(tmp_path / "m")], "model_state.pdparams"
    if case == "base/train":
        base = pickled_model_dir(tmp_path / "base", marker)
        return ["ftlab", f"model.name_or_path={base}", *TINY], "model_state.pdparams"
    if case in ("truncated-adapter/predict", "garbage-adapter/merge"):
        run = copy_run(runs["lora"], tmp_path / "run")
        (shard,) = (run / "final").glob("peft_model-*.safetensors")
        body = shard.read_bytes()
        shard.write_bytes(body[: len(body) // 2] if case.startswith("truncated") else b"\x00" * 64)
        command = (
            predict(run, tmp_path)
            if case.endswith("predict")
            else ["ftlab-merge", str(run), "--out", str(tmp_path / "m")]
        )
        return command, f"{shard.name} is damaged"
    assert case == "checkpoint/resume"
    run = copy_run(runs["lora"], tmp_path / "run")
    (checkpoint,) = (run / "checkpoints").glob("checkpoint-*")
    plant(checkpoint / "lora_model_state.pdparams", marker)
    return ["ftlab", f"resume={run}", "train.max_steps=3"], "lora_model_state.pdparams"


CASES = [
    "lora-final/predict",
    "lora-final/merge",
    "lora-final/init_from",
    "full-final/predict",
    "init_model/predict",
    "recorded-base/merge",
    "base/train",
    "checkpoint/resume",
]
DAMAGED = ["truncated-adapter/predict", "garbage-adapter/merge"]


def run_case(case: str, runs, tmp_path: Path) -> tuple[str, str, Path]:
    """(the one error line, what it must name, the marker) of one case."""
    marker = tmp_path / "marker"
    command, name = setup_case(case, runs, tmp_path, marker)
    exe = FTLAB.with_name(command[0])
    env = without_paddle_vars(os.environ)
    proc = subprocess.run(
        [str(exe), *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert not marker.exists(), f"the pickle ran: {proc.stderr[-2000:]}"
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if " error: " in line]
    assert errors == lines[-1:], proc.stderr[-3000:]  # one line, the last (resume notes first)
    return errors[0], name, marker


@pytest.mark.parametrize("case", CASES)
def test_a_planted_pickle_is_never_read(case, runs, tmp_path):
    line, name, _ = run_case(case, runs, tmp_path)
    assert f"{name}: a pickle" in line and "model.allow_pickle=true" in line, line


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_adapter_is_one_line_naming_it(case, runs, tmp_path):
    line, name, _ = run_case(case, runs, tmp_path)
    assert name in line, line


def test_predict_prints_its_own_lines_only(runs, tmp_path):
    """No PaddleNLP INFO lines or Paddle deprecation warnings on ftlab-predict's console."""
    command = predict(runs["lora"], tmp_path)
    proc = subprocess.run(
        [str(FTLAB.with_name(command[0])), *command[1:], "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == ""
    assert proc.stdout.strip().splitlines() == [f"wrote 1 generations to {tmp_path / 'o'}"]


def test_a_base_whose_weights_changed_since_training_is_refused(runs, tmp_path):
    run = copy_run(runs["lora"], tmp_path / "run")
    record = json.loads((run / "final" / "ftlab_method.json").read_text())
    assert set(record["base_weights_sha256"]) == {"model.safetensors"}
    base = tmp_path / "base"
    shutil.copytree(asset_path("stories260k"), base)
    weights = bytearray((base / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # one byte of the last tensor's data
    (base / "model.safetensors").write_bytes(bytes(weights))
    assert changed_weights(asset_path("stories260k"), record["base_weights_sha256"]) == []
    assert changed_weights(base, record["base_weights_sha256"])[0].startswith(
        "model.safetensors: sha256 "
    )
    path = run / "resolved_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["name_or_path"] = str(base)
    path.write_text(yaml.safe_dump(cfg))
    command = predict(run, tmp_path)
    proc = subprocess.run(
        [str(FTLAB.with_name(command[0])), *command[1:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"the base model {base} changed since the run trained (model.safetensors" in line
