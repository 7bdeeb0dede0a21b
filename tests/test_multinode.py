"""Several nodes, without starting any: the rendezvous bound, the failed rank named from
the nodes' records, and the config check between nodes. The multi-process runs of the same
behaviour are in tests/test_distributed.py (slow)."""

from __future__ import annotations

import http.server
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import CPU, GPU8, compose_cfg, compose_run, free_port

from ftlab.config.derived import Derived
from ftlab.distributed import rendezvous
from ftlab.distributed.failures import FAILED_RECORD, analyse_failure
from ftlab.distributed.launch import check_launch, launch_command, record_worker
from ftlab.distributed.paddle_launch import pop_option, rendezvous_timeout_message
from ftlab.errors import ConfigError
from ftlab.resolve.validate import validate

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast

TWO_NODES = ["parallel=dp2", "parallel.nproc_per_node=1", "launch.nnodes=2"]
DERIVED = Derived(
    device="cpu", world_size=2, nproc_per_node=1, data_parallel_degree=2, global_batch_size=8
)


@pytest.mark.parametrize(
    ("overrides", "world", "per_node", "data"),
    [
        (["parallel=dp8"], 8, 8, 8),
        (["parallel=dp8", "launch.nnodes=2"], 16, 8, 16),
        (["parallel=tp4", "launch.nnodes=2"], 8, 4, 2),
        (["parallel=dp8", "parallel.nproc_per_node=4", "launch.nnodes=2"], 8, 4, 8),
    ],
)
def test_a_layout_on_several_nodes_derives_the_data_degree_from_the_world(
    overrides: list[str], world: int, per_node: int, data: int
) -> None:
    """dp2/dp8 name the processes per node, like every layout: `parallel=dp8
    launch.nnodes=2` is 16-way data parallel (it used to be refused: data 8 vs world 16)."""
    gpu = ["device=gpu", "precision=bf16", "model=llama3", "launch.master=10.0.0.1:8090"]
    derived = validate(compose_run([*gpu, *overrides]), GPU8)
    assert (derived.world_size, derived.nproc_per_node, derived.data_parallel_degree) == (
        world,
        per_node,
        data,
    )


def test_a_fixed_data_degree_that_misses_the_world_names_nodes_and_processes() -> None:
    run = compose_run([*TWO_NODES, "parallel.data=4", "launch.master=127.0.0.1:8090"])
    with pytest.raises(
        ConfigError,
        match=r"parallel.data=4 does not match world size 2 \(2 nodes x 1 processes per node",
    ):
        validate(run, CPU)


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_rendezvous_timeout_must_be_positive_seconds(value: str) -> None:
    run = compose_run(
        [*TWO_NODES, "launch.master=127.0.0.1:8090", f"launch.rendezvous_timeout={value}"]
    )
    with pytest.raises(ConfigError, match=r"launch.rendezvous_timeout=.*: must be a number > 0"):
        validate(run, CPU)
    with pytest.raises(ConfigError, match="launch.rendezvous_timeout"):
        check_launch(run)


def test_only_a_multinode_command_bounds_the_rendezvous(tmp_path: Path) -> None:
    run = compose_run([*TWO_NODES, "launch.master=10.0.0.1:8090", "launch.rendezvous_timeout=45"])
    cmd = launch_command(run, DERIVED, tmp_path, [])
    assert cmd[3:5] == ["--rendezvous_timeout", "45"]
    single = launch_command(compose_run(["parallel=dp2"]), DERIVED, tmp_path, [])
    assert "--rendezvous_timeout" not in single
    # paddle_launch takes its own option off before Paddle's parser sees the rest, and
    # leaves the worker's arguments alone.
    rest, value = pop_option(cmd[3:], "--rendezvous_timeout")
    assert value == "45" and rest == cmd[5:]
    worker = ["--nnodes", "2", sys.executable, "-m", "x", "--rendezvous_timeout", "9"]
    assert pop_option(worker, "--rendezvous_timeout") == (worker, None)


def test_timeout_message_says_whether_the_master_answered() -> None:
    silent = f"127.0.0.1:{free_port()}"  # nothing listens there
    msg = rendezvous_timeout_message(silent, "2", 20)
    assert msg.startswith(f"no answer from the master launch.master={silent} within ")
    assert "launch.rendezvous_timeout=20 s" in msg

    class OneNodeJoined(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # Paddle's KV master: GET /ftlab/info lists the nodes
            body = json.dumps({"/ftlab/info/aaaaaa/-1": "{}"} if self.path == "/ftlab/info" else {})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), OneNodeJoined)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        master = f"127.0.0.1:{server.server_address[1]}"
        msg = rendezvous_timeout_message(master, "2", 20)
    finally:
        server.shutdown()
    assert f"launch.master={master} answers, but 1 of 2 nodes joined within" in msg


LAUNCHER_KILLED = (
    "LAUNCH ERROR Container failed !!!\n"
    "Container rank 0 status failed cmd ['python', '-m', 'ftlab.cli.app'] code -9 log x\n"
)
LAUNCHER_ABORTED = LAUNCHER_KILLED.replace("code -9", "code -6")
GLOO_TIMEOUT = (
    "step     3/200  loss 1.3507\n"
    "terminate called after throwing an instance of 'gloo::TimeoutException'\n"
    "  what():  [/paddle/third_party/gloo/gloo/transport/tcp/pair.cc:584] TIMEOUT "
    "self_rank = 0 pair_rank = 1 peer_str = [127.0.0.1]:4738\n"
)


def node_dir(logs: Path, name: str, rank: int, host: str, log: str) -> Path:
    d = logs / name
    d.mkdir(parents=True)
    (d / "workerlog.0").write_text(log)
    record = {"rank": rank, "local_rank": 0, "world_size": 2, "host": host, "pid": 1}
    (d / "worker.0.json").write_text(json.dumps(record))
    return d


def test_killed_workers_node_names_its_job_rank_and_tells_the_others(tmp_path: Path) -> None:
    run = compose_run([*TWO_NODES, "launch.master=10.0.0.1:8090"])
    node_b = node_dir(tmp_path, "node-b-22", 1, "hostb", "step     3/200  loss 1.3507\n")
    err = analyse_failure(run, 247, LAUNCHER_KILLED, node_b, peer_wait=0)
    # Paddle's report says "rank 0" (the node's own count); the job rank is 1.
    assert (
        "Rank 1 (host hostb, local rank 0, logs/node-b-22) failed (killed by SIGKILL, exit -9)"
        in str(err)
    )
    assert err.status_fields == {"failed_rank": 1, "failed_exit": -9, "failed_host": "hostb"}
    report = json.loads((node_b / FAILED_RECORD).read_text())
    assert report == {"rank": 1, "host": "hostb", "exit_code": -9, "node": "node-b-22"}


def test_surviving_node_names_the_failed_rank_of_the_other_node(tmp_path: Path) -> None:
    run = compose_run([*TWO_NODES, "launch.master=10.0.0.1:8090"])
    node_a = node_dir(tmp_path, "node-a-11", 0, "hosta", GLOO_TIMEOUT)
    # Without the other node's report, gloo's pair_rank names the peer.
    err = analyse_failure(run, 250, LAUNCHER_ABORTED, node_a, peer_wait=0)
    assert str(err).startswith(
        "parallel=dp2: the distributed job failed (paddle.distributed.launch exited with 250). "
        "Rank 1 (gloo peer [127.0.0.1]:4738) went away, and its node wrote no failed.json"
    )
    assert "on this node rank 0 (host hosta, local rank 0, logs/node-a-11) stopped" in str(err)
    assert err.status_fields == {"failed_rank": 1, "stopped_ranks": [0]}
    assert not (node_a / FAILED_RECORD).exists()  # it did not fail by itself
    # A report from an earlier attempt in the same run dir is not this job's ...
    node_b = tmp_path / "node-b-22"
    node_b.mkdir()
    report = json.dumps({"rank": 1, "host": "hostb", "exit_code": -9, "node": "node-b-22"})
    (node_b / FAILED_RECORD).write_text(report)
    err = analyse_failure(run, 250, LAUNCHER_ABORTED, node_a, since=time.time() + 60, peer_wait=0)
    assert "went away" in str(err)
    # A frozen peer: gloo gives up after ~30 s with a Python error naming no rank.
    (node_a / "workerlog.0").write_text(
        "RuntimeError: [/paddle/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:80] "
        "TIMEOUT self_rank = none pair_rank = -1 peer_str = none\n"
    )
    later = time.time() + 60  # node-b's report is from an earlier attempt
    err = analyse_failure(run, 1, LAUNCHER_ABORTED.replace("-6", "1"), node_a, later, 0)
    assert "A rank on another node (gloo peer unknown) went away" in str(err)
    assert "on this node rank 0 (host hosta, local rank 0, logs/node-a-11) stopped" in str(err)
    (node_a / "workerlog.0").write_text(GLOO_TIMEOUT)
    # ... this job's is read, waited for when it comes later than this node's failure.
    (node_b / FAILED_RECORD).unlink()
    threading.Timer(0.6, (node_b / FAILED_RECORD).write_text, [report]).start()
    err = analyse_failure(run, 250, LAUNCHER_ABORTED, node_a, since=time.time() - 1, peer_wait=5)
    expected = "Rank 1 (host hostb, logs/node-b-22) failed (killed by SIGKILL, exit -9); on this"
    assert expected in str(err)
    assert err.status_fields == {
        "failed_rank": 1,
        "failed_host": "hostb",
        "failed_exit": -9,
        "stopped_ranks": [0],
    }


def test_worker_records_its_rank_only_in_a_multinode_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"PADDLE_TRAINER_ID": "3", "PADDLE_TRAINERS_NUM": "4", "PADDLE_LOCAL_RANK": "1"}
    for k, v in {**env, "PADDLE_LOG_DIR": str(tmp_path), "PADDLE_NNODES": "1"}.items():
        monkeypatch.setenv(k, v)
    record_worker()
    assert list(tmp_path.iterdir()) == []  # one node: Paddle's ranks are the job's
    monkeypatch.setenv("PADDLE_NNODES", "2")
    record_worker()
    record = json.loads((tmp_path / "worker.1.json").read_text())
    assert record == {
        "rank": 3,
        "local_rank": 1,
        "world_size": 4,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


class FakeStore:
    """The TCP store's set / blocking get / add, in one process."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self.cond:
            self.data[key] = value
            self.cond.notify_all()

    def get(self, key: str) -> bytes:
        with self.cond:
            assert self.cond.wait_for(lambda: key in self.data, timeout=10), key
            return self.data[key]

    def add(self, key: str, n: int) -> int:
        with self.cond:
            value = int(self.data.get(key, b"0")) + n
            self.data[key] = str(value).encode()
            self.cond.notify_all()
            return value


def run_ranks(configs: list, timeout: float = 10) -> list[BaseException | None]:
    """check_same_config on one thread per rank; what each rank raised."""
    store, results = FakeStore(), [None] * len(configs)

    def rank(r: int) -> None:
        try:
            rendezvous.check_same_config(configs[r], timeout, store, rank=r, world=len(configs))
        except BaseException as err:  # noqa: BLE001 - the test compares them
            results[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_nodes_with_the_same_config_pass() -> None:
    cfg = compose_cfg(TWO_NODES)
    assert run_ranks([cfg, compose_cfg(TWO_NODES)]) == [None, None]


def test_nodes_with_different_overrides_fail_alike_naming_the_first_key() -> None:
    a = compose_cfg(TWO_NODES)
    b = compose_cfg([*TWO_NODES, "train.learning_rate=0.001", "train.seed=7"])
    errors = run_ranks([a, b])
    assert all(isinstance(e, ConfigError) for e in errors), errors
    assert str(errors[0]) == str(errors[1])
    host = socket.gethostname()
    assert str(errors[0]) == (
        "the nodes of this job were given different configs; first difference: "
        f"train.learning_rate: 0.01 (rank 0 on host {host}) vs 0.001 (rank 1 on host {host}). "
        "Start every node with the same overrides."
    )


def test_a_rank_that_never_reaches_the_check_is_named_within_the_timeout() -> None:
    store = FakeStore()
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"only 1 of 2 ranks reached .* launch.rendezvous_timeout=0.5 s"
    ):
        rendezvous.check_same_config(compose_cfg(TWO_NODES), 0.5, store, rank=0, world=2)
    assert time.monotonic() - started < 5


def test_digest_ignores_key_order_and_first_difference_sees_missing_keys() -> None:
    flat = rendezvous.flat_config({"train": {"lr": 0.01, "seed": 1}, "mode": "train"})
    assert flat == {"train.lr": 0.01, "train.seed": 1, "mode": "train"}
    swapped = {"mode": "train", "train.seed": 1, "train.lr": 0.01}
    assert rendezvous.config_digest(flat) == rendezvous.config_digest(swapped)
    assert rendezvous.config_digest(flat) != rendezvous.config_digest({**flat, "train.lr": 0.1})
    assert rendezvous.first_difference(flat, {**flat, "x": 1}) == ("x", "<absent>", 1)
    assert rendezvous.first_difference(flat, dict(swapped)) is None
