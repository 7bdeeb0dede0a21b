"""RNG and LR-scheduler state in a Trainer checkpoint as JSON, not as PaddleNLP's pickles.

PaddleNLP's Trainer saves the random generators (``rng_state*.pth``) and the scheduler
(``scheduler.pdparams``) with ``paddle.save``, a pickle, and unpickles them on resume: a
checkpoint from someone else could run code. ``FtlabTrainer`` writes the same state here
as JSON (``rng_state.rank<N>.json``, ``scheduler.json``) and removes PaddleNLP's files.
Every value is a number or a list of numbers: Python's and NumPy's Mersenne Twister
states, and Paddle's ``GeneratorState`` through its own pickling protocol
(``__getstate__`` gives a tuple of ints and a list of ints; ``__setstate__`` takes it back).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SCHEDULER_JSON = "scheduler.json"
PADDLE_SCHEDULER = "scheduler.pdparams"
PADDLE_RNG = ("rng_state.pth", "rng_state_*.pth")


def rng_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"rng_state.rank{rank}.json"


def _generator_state(state: Any) -> list[Any]:
    return list(state.__getstate__())


def _generator_from(record: list[Any]) -> Any:
    from paddle.base import core

    state = core.GeneratorState.__new__(core.GeneratorState)
    state.__setstate__(tuple(record))
    return state


def rng_record(hybrid_parallel: bool) -> dict[str, Any]:
    """This process's generators, as PaddleNLP's ``_save_checkpoint`` captures them."""
    import numpy as np
    import paddle

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    record: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "device": [_generator_state(s) for s in paddle.get_rng_state()],
        "cpu": _generator_state(paddle.framework.core.default_cpu_generator().get_state()),
    }
    if hybrid_parallel:
        from paddle.distributed import fleet

        tracker = fleet.meta_parallel.get_rng_state_tracker().get_states_tracker()
        record["hybrid_parallel_rng_state_tracker"] = {
            name: [_generator_state(s) for s in states] for name, states in tracker.items()
        }
    return record


def restore_rng(record: dict[str, Any], hybrid_parallel: bool, tensor_parallel: bool) -> None:
    """Set this process's generators from ``rng_record``'s output."""
    import numpy as np
    import paddle

    version, mt, gauss = record["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = record["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    paddle.set_rng_state([_generator_from(s) for s in record["device"]])
    paddle.framework.core.default_cpu_generator().set_state(_generator_from(record["cpu"]))
    tracker = record.get("hybrid_parallel_rng_state_tracker")
    if hybrid_parallel and tracker:
        from paddle.distributed import fleet

        if not tensor_parallel:  # as PaddleNLP: this state exists only with tensor parallel
            tracker = {k: v for k, v in tracker.items() if k != "model_parallel_rng"}
        fleet.meta_parallel.get_rng_state_tracker().set_states_tracker(
            {name: [_generator_from(s) for s in states] for name, states in tracker.items()}
        )


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def scheduler_record(scheduler: Any) -> dict[str, Any]:
    """A Paddle LR scheduler's ``state_dict``: plain numbers (NumPy scalars made Python)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in scheduler.state_dict().items()}
