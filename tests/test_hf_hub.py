"""A hub name whose snapshot is in the local Hugging Face cache behaves like the directory it
is: composition, validation and ``mode=plan`` read the snapshot's config.json (no
``model.family``), training converts it from the snapshot, and the run's provenance names
the snapshot and revision. The cache here is built the way ``huggingface-cli download``
lays it out (``models--Org--Name/blobs`` + ``snapshots/<commit>`` symlinks + ``refs``)
from a transformers-written fixture."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import CPU, compose_run, run_ftlab_forked

from ftlab.errors import ConfigError
from ftlab.resolve.validate import validate

FIXTURES = Path(__file__).resolve().parent / "fixtures"
QWEN2 = FIXTURES / "hf" / "qwen2-tiny"
NAME = "Qwen/Qwen2-0.5B-Instruct"
COMMIT = "5f2b0b9a7c1d4e3f8a6b2c9d0e1f2a3b4c5d6e7f"
OLD_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHORT = "data.max_length=128"  # the tiny fixture's context is 128


def add_snapshot(hub: Path, name: str, source: Path, commit: str, refs: tuple[str, ...]) -> Path:
    """``source``'s files as the snapshot ``commit`` of ``name``, each ref naming it."""
    repo = hub / f"models--{name.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if not f.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes
    return snap


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from ftlab.interop import hf_in

    root = tmp_path / "hf-home" / "hub"
    add_snapshot(root, NAME, QWEN2, COMMIT, ("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "ftlab-cache"))
    monkeypatch.setattr(hf_in, "_converted", {})
    return root


@pytest.mark.fast
def test_hub_name_composes_and_validates_like_its_snapshot_directory(hub: Path) -> None:
    run = compose_run([f"model.name_or_path={NAME}", SHORT])
    local = compose_run([f"model.name_or_path={QWEN2}", SHORT])
    assert run.model.family == "qwen2"
    assert run.model.arch == local.model.arch
    assert run.model.lora_target_modules == local.model.lora_target_modules
    assert run.model.name == "Qwen2-0.5B-Instruct"
    assert run.model.name_or_path == NAME  # what the user said is what the run records
    validate(run, CPU)
    # a value set by hand must agree with the snapshot's config.json, as with a directory
    with pytest.raises(ConfigError, match=r"model.family=llama contradicts .*snapshots/5f2b"):
        compose_run([f"model.name_or_path={NAME}", "model.family=llama", SHORT])
    with pytest.raises(ConfigError, match=r"model.arch.hidden_size=64 contradicts .*snapshots"):
        compose_run([f"model.name_or_path={NAME}", "model.arch.hidden_size=64", SHORT])


@pytest.mark.fast
def test_revision_picks_the_snapshot_a_ref_or_commit_names(hub: Path, tmp_path: Path) -> None:
    older = tmp_path / "older"
    shutil.copytree(QWEN2, older)
    cfg = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    add_snapshot(hub, NAME, older, OLD_COMMIT, ("v1",))
    layers = {
        ref: compose_run([f"model.name_or_path={NAME}{ref}", SHORT]).model.arch.num_hidden_layers
        for ref in ("", "@main", "@v1", f"@{OLD_COMMIT}", f"@{COMMIT}")
    }
    assert layers == {"": 2, "@main": 2, "@v1": 1, f"@{OLD_COMMIT}": 1, f"@{COMMIT}": 2}
    with pytest.raises(ConfigError) as err:
        compose_run([f"model.name_or_path={NAME}@v9", "model.family=qwen2", SHORT])
    message = str(err.value)
    assert "revision 'v9' of Qwen/Qwen2-0.5B-Instruct is not in the local Hugging Face" in message
    assert f"huggingface-cli download {NAME} --revision v9" in message


@pytest.mark.fast
def test_uncached_hub_name_without_family_names_where_ftlab_looked(hub: Path) -> None:
    with pytest.raises(ConfigError) as err:
        compose_run(["model.name_or_path=someone/not-cached"])
    message = str(err.value)
    assert f"looked in {hub / 'models--someone--not-cached'}" in message
    assert "huggingface-cli download someone/not-cached" in message
    assert "\n" not in message


@pytest.mark.fast
def test_paddlenlp_community_names_are_unchanged(hub: Path) -> None:
    """A shipped option (family and numbers set, PaddleNLP's own downloader) composes as
    before with no snapshot; with a snapshot of the same name its config.json is read and
    must agree with the option's numbers (the public config.json does)."""
    before = compose_run(["model=qwen2_5_0_5b"])
    public = FIXTURES / "model_configs" / "qwen2_5_0_5b.json"
    staged = hub.parent / "public"
    staged.mkdir()
    shutil.copy(public, staged / "config.json")
    add_snapshot(hub, before.model.name_or_path, staged, COMMIT, ("main",))
    after = compose_run(["model=qwen2_5_0_5b"])
    assert after.model.arch == before.model.arch and after.model.family == "qwen2"


def test_plan_and_a_short_run_from_the_hub_name(hub: Path, tmp_path: Path) -> None:
    """``mode=plan`` with only the hub name: the plan the snapshot directory gets, no weights
    read (the ftlab cache stays empty); then 3 steps of training convert it from the
    snapshot and record the snapshot and revision; the Hugging Face cache is not written."""
    cache = Path(os.environ["FTLAB_CACHE"])
    before = {p: p.lstat().st_mtime_ns for p in hub.rglob("*")}

    def plan(name: str) -> str:
        out = run_ftlab_forked(
            tmp_path, "mode=plan", f"model.name_or_path={name}", "model.name=m", SHORT
        )
        text = out.stdout
        text = re.sub(r"\d\d-\d\d-\d\d_m_lora(-\d+)?", "T_m_lora", text)  # same second: -2
        return re.sub(r"budget .*", "", text)

    assert plan(NAME) == plan(str(QWEN2))
    assert not cache.exists()
    run_ftlab_forked(
        tmp_path,
        f"model.name_or_path={NAME}",
        SHORT,
        "train.max_steps=3",
        "eval.max_new_tokens=4",
    )
    (run,) = (tmp_path / "outputs").glob("*/*_Qwen2-0.5B-Instruct_lora")
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    (conversion,) = json.loads((run / "model_source.json").read_text())["hf_conversions"]
    snap = hub / "models--Qwen--Qwen2-0.5B-Instruct" / "snapshots" / COMMIT
    assert conversion["hub"] == {
        "repo": NAME,
        "revision": "main",
        "commit": COMMIT,
        "snapshot": str(snap),
    }
    assert conversion["source"] == str(snap.resolve())
    assert conversion["family"] == "qwen2"
    assert {p: p.lstat().st_mtime_ns for p in hub.rglob("*")} == before


def test_uncached_hub_name_is_one_line_before_any_work(tmp_path: Path, hub: Path) -> None:
    proc = run_ftlab_forked(tmp_path, "model.name_or_path=someone/not-cached", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ftlab: error: model.name_or_path=")
    assert "Traceback" not in proc.stderr + proc.stdout
