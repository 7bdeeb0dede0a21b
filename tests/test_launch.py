"""The launcher's command line, failure reports and env-dump cleanup; the global-batch sampler."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import CPU, compose_run

from ftlab.config.derived import Derived
from ftlab.config.environment import Environment
from ftlab.distributed.batching import GlobalBatchSampler, target_tokens
from ftlab.distributed.failures import failed_ranks, failure_message
from ftlab.distributed.launch import (
    check_launch,
    gpu_devices,
    launch_command,
    needs_launch,
    remove_env_dumps,
    worker_overrides,
)
from ftlab.errors import ConfigError
from ftlab.resolve.validate import check_demo_metric, validate

DERIVED_DP2 = Derived(
    device="cpu", world_size=2, nproc_per_node=2, data_parallel_degree=2, global_batch_size=32
)


def test_cpu_command_has_no_devices_and_fixes_run_dir(tmp_path: Path) -> None:
    run = compose_run(["parallel=dp2"])
    cmd = launch_command(run, DERIVED_DP2, tmp_path, ["parallel=dp2", "train.max_steps=3"])
    assert cmd[:3] == [sys.executable, "-m", "ftlab.distributed.paddle_launch"]
    assert "--devices" not in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[cmd.index("--log_dir") + 1] == str(tmp_path / "logs")
    worker = cmd[cmd.index("ftlab.cli.app") - 3 :]
    assert worker == [
        sys.executable,
        "-u",
        "-m",
        "ftlab.cli.app",
        "parallel=dp2",
        "train.max_steps=3",
        f"hydra.run.dir='{tmp_path}'",
        "hydra.output_subdir=null",
        "hydra/job_logging=ftlab_worker",
    ]


def test_gpu_devices_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert gpu_devices(2) == ["4", "5"]
    with pytest.raises(ConfigError, match="4 worker processes need 4 GPUs.*offers 2"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        gpu_devices(4)


def test_multinode_flags_pass_through(tmp_path: Path) -> None:
    run = compose_run(["parallel=dp2", "launch.nnodes=2", "launch.master=10.0.0.1:8090"])
    check_launch(run)
    cmd = launch_command(run, DERIVED_DP2.with_(world_size=4), tmp_path, [], ["0", "1"])
    assert cmd[cmd.index("--nnodes") + 1] == "2"
    assert cmd[cmd.index("--master") + 1] == "10.0.0.1:8090"
    assert cmd[cmd.index("--devices") + 1] == "0,1"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["launch.nnodes=2"], "needs a rendezvous point|need a rendezvous point"),
        (["launch.nnodes=2", "launch.ips=10.0.0.1"], "names 1 nodes but launch.nnodes=2"),
        (["launch.master=nohost"], "must be HOST:PORT"),
    ],
)
def test_bad_multinode_settings(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_launch(compose_run(["parallel=dp2", *overrides]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel=tp2"], "parallel.cpu_emulation=true"),
        (["parallel=pp2"], "tensor- or pipeline-parallel layout on CPU"),
        (["parallel=sharding_stage2", "parallel.cpu_emulation=true"], "stage 2 asserts a GPU"),
        (["parallel=tp2_sp", "parallel.cpu_emulation=true"], "sequence parallelism is not"),
    ],
)
def test_cpu_layouts_outside_the_emulation_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_run(overrides), CPU)


def test_tensor_parallel_emulation_validates_on_cpu() -> None:
    derived = validate(compose_run(["parallel=tp2", "parallel.cpu_emulation=true"]), CPU)
    assert (derived["world_size"], derived["data_parallel_degree"]) == (2, 1)


def test_tensor_with_pipeline_is_not_emulated() -> None:
    eight_cores = Environment(device="cpu", device_count=8, paddle_version="3.3.1")
    with pytest.raises(ConfigError, match="tensor 4 x pipeline 2 together is not emulated"):
        validate(compose_run(["parallel=tp4_pp2", "parallel.cpu_emulation=true"]), eight_cores)


PP2_EMULATED = ["parallel=pp2", "parallel.cpu_emulation=true", "eval.demo_metric=false"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_pipeline_emulation_validates_on_cpu(method: str) -> None:
    derived = validate(
        compose_run([*PP2_EMULATED, f"method={method}", "train.gradient_accumulation_steps=3"]),
        CPU,
    )
    assert (derived["world_size"], derived["data_parallel_degree"]) == (2, 1)
    # PaddleNLP's PipelineParallel: accumulate_steps micro-batches of the per-device batch.
    assert derived["pipeline_micro_batch_size"] == 16
    assert derived["pipeline_accumulate_steps"] == 3
    assert derived["global_batch_size"] == 48


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=prefix"], "method=prefix with parallel=pp2.*no pipeline-parallel"),
        (["method=qlora"], "method=qlora with parallel=pp2.*no pipeline-parallel"),
        (
            ["model=llama2", "model.arch.num_hidden_layers=1", "data.max_length=512"],
            "parallel.pipeline=2 exceeds .* 1 layers",
        ),
    ],
)
def test_pipeline_settings_a_pipeline_model_cannot_honour(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_run([*PP2_EMULATED, *overrides]), CPU)


def test_demo_metric_is_refused_for_a_pipeline_model_when_it_would_run() -> None:
    records = [{"src": "a", "tgt": "b", "entities": ["Tom"]}]
    run = compose_run(["parallel=pp2", "parallel.cpu_emulation=true"])
    with pytest.raises(ConfigError, match="eval.demo_metric=true with parallel=pp2.*=false"):
        check_demo_metric(run, records)
    check_demo_metric(run, [{"src": "a", "tgt": "b"}])  # no entities: the metric never runs
    check_demo_metric(compose_run([*PP2_EMULATED]), records)  # switched off by the user
    check_demo_metric(compose_run(["parallel=dp2"]), records)  # no pipeline: it can generate


def test_pipeline_layout_loads_the_pipe_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_model picks PaddleNLP's ...ForCausalLMPipe when fleet has pipeline stages."""
    from paddlenlp.transformers import AutoModelForCausalLM, AutoModelForCausalLMPipe

    import ftlab.models.loading

    calls: list = []

    def fake_load(kind: str, loader: object, name: str, **kwargs: object) -> object:
        import paddle

        calls.append((loader, kwargs))
        return paddle.nn.Layer()  # an empty model: loading's finishing touches find no layer

    monkeypatch.setattr(ftlab.models.loading, "load_pretrained", fake_load)
    cfg = compose_run([]).model
    for degree, expected in ((1, AutoModelForCausalLM), (2, AutoModelForCausalLMPipe)):
        monkeypatch.setattr(ftlab.models.loading, "pipeline_degree", lambda d=degree: d)
        ftlab.models.loading.load_model(cfg, "float32")
        assert calls[-1][0] is expected, (degree, calls[-1])
    assert ftlab.models.loading.causal_lm_class(4) is AutoModelForCausalLMPipe
    # tensor x pipeline: the Pipe class still gets this rank's tensor-parallel shard.
    tp = {"tensor_parallel_degree": 2, "tensor_parallel_rank": 1, "tensor_parallel_output": False}
    monkeypatch.setattr(ftlab.models.loading, "model_parallel_kwargs", lambda: dict(tp))
    ftlab.models.loading.load_model(cfg, "float32")
    loader, kwargs = calls[-1]
    assert loader is AutoModelForCausalLMPipe and tp.items() <= kwargs.items()


def test_user_run_dir_override_is_replaced(tmp_path: Path) -> None:
    out = worker_overrides(["hydra.run.dir=/elsewhere", "method=full"], tmp_path)
    assert "hydra.run.dir=/elsewhere" not in out
    assert f"hydra.run.dir='{tmp_path}'" in out and "method=full" in out


def test_a_sweep_job_dir_reaches_the_workers_whole(tmp_path: Path) -> None:
    """A sweep job's dir name holds its overrides ('=', ',', brackets, quotes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = tmp_path / "0_a=1,b=[2,3],c=it's"
    (item,) = [o for o in worker_overrides([], run_dir) if o.startswith("hydra.run.dir=")]
    assert OverridesParser.create().parse_override(item).value() == str(run_dir)


def test_needs_launch_only_outside_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    two, one = DERIVED_DP2, DERIVED_DP2.with_(world_size=1)
    assert needs_launch(two) and not needs_launch(one)
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    assert not needs_launch(two)


def test_env_dumps_are_removed_and_logs_kept(tmp_path: Path) -> None:
    names = [
        "envlog.0",
        "envlog.1",
        "backup_env.0.json",
        "ftlab.abcd.log",
        "workerlog.0",
        "workerlog.1",
    ]
    for n in names:
        (tmp_path / n).write_text("SECRET=1\n")
    removed = remove_env_dumps(tmp_path)
    assert sorted(removed) == ["backup_env.0.json", "envlog.0", "envlog.1", "ftlab.abcd.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workerlog.0", "workerlog.1"]


LAUNCHER_FAILURE = """LAUNCH INFO Pod failed
LAUNCH ERROR Container failed !!!
Container rank 1 status failed cmd ['python', '-m', 'ftlab.cli.app'] code 2 log logs/workerlog.1
LAUNCH INFO Exit code 2
"""


def test_failing_rank_and_log_tail_are_reported(tmp_path: Path) -> None:
    (tmp_path / "workerlog.0").write_text("fine\n")
    (tmp_path / "workerlog.1").write_text(
        "".join(f"line {i}\n" for i in range(100)) + "ftlab: error: something broke\n"
    )
    assert failed_ranks(LAUNCHER_FAILURE, tmp_path) == [(1, 2)]
    msg = failure_message(compose_run(["parallel=dp2"]), 2, LAUNCHER_FAILURE, tmp_path)
    assert "parallel=dp2" in msg and "Rank 1 failed (exit 2)" in msg
    assert "ftlab: error: something broke" in msg and "line 99" in msg and "line 10\n" not in msg


def test_failing_rank_found_from_traceback_when_launcher_silent(tmp_path: Path) -> None:
    (tmp_path / "workerlog.0").write_text("Traceback (most recent call last):\nboom\n")
    (tmp_path / "workerlog.1").write_text("ok\n")
    assert failed_ranks("killed", tmp_path) == [(0, None)]


class _Data:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _batches(n: int, batch: int, ranks: int, rank: int, epoch: int = 0) -> list[list[int]]:
    s = GlobalBatchSampler(_Data(n), batch, num_replicas=ranks, rank=rank, seed=7)
    s.set_epoch(epoch)
    return list(s)


@pytest.mark.parametrize("n", [16, 22])
def test_ranks_get_contiguous_halves_of_the_single_process_batches(n: int) -> None:
    single = _batches(n, 4, 1, 0)
    r0, r1 = _batches(n, 2, 2, 0), _batches(n, 2, 2, 1)
    assert len(single) == len(r0) == len(r1) == -(-n // 4)
    for whole, a, b in zip(single, r0, r1, strict=True):
        assert a + b == whole
    flat = [i for batch in single for i in batch]
    assert sorted(flat) == list(range(n))  # each example exactly once per epoch


def test_tail_smaller_than_ranks_is_skipped_and_epochs_reshuffle() -> None:
    assert [len(b) for b in _batches(9, 2, 2, 0)] == [2, 2]  # 9 = 2 x 4 + 1: tail of 1
    assert _batches(16, 4, 1, 0, epoch=0) != _batches(16, 4, 1, 0, epoch=1)
    assert _batches(16, 4, 1, 0, epoch=1) == _batches(16, 4, 1, 0, epoch=1)


def test_unshuffled_order_is_dataset_order() -> None:
    s = GlobalBatchSampler(_Data(6), 2, num_replicas=1, rank=0, seed=0, shuffle=False)
    assert list(s) == [[0, 1], [2, 3], [4, 5]]


def test_target_tokens_ignores_masked_positions() -> None:
    labels = np.array([[5, -100, 7], [-100, -100, 1]])
    assert target_tokens(labels) == 3
