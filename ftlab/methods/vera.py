"""VeRA (Kopiczko et al. 2024): frozen random projections, trained per-layer scaling vectors.

Each adapted layer computes ``x @ W + (x @ A * d) @ B * b`` with ``A`` (``[in, r]``) and
``B`` (``[r, out]``) frozen and random, and only the vectors ``d`` (``[r]``) and ``b``
(``[out]``) trained. PaddleNLP 3.0.0b4's ``VeRALinear`` departs from that in two ways
ftlab corrects:

* it initialises ``B`` to zero and keeps it frozen (unless PiSSA init rewrites the base),
  so the update stays exactly zero and nothing learns. ftlab draws ``B`` at random and
  starts ``b`` at 0 and ``d`` at ``vera_d_init``, as in the paper (the update starts at 0
  yet both vectors get gradients after the first step);
* it saves only the trained vectors (as a pickle: ftlab writes safetensors, see
  ``ftlab.methods.state``), so the random ``A``/``B`` are lost and a reload
  computes something else. ftlab draws them from NumPy's ``RandomState`` (whose stream
  NumPy keeps frozen across versions) from ``vera_seed``, shares one pair across layers
  as the paper does (each layer uses the top-left block it needs), records the seed and
  a SHA-256 of the exact matrices in ``ftlab_vera.json``, and on load regenerates them
  and refuses to continue unless they are bit-identical.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import MethodConfig
from ftlab.errors import ConfigError, ModelLoadError
from ftlab.methods.linear import LinearAdapterMethod, target_patterns
from ftlab.methods.merging import fold_linear_adapters
from ftlab.methods.registry import register_method
from ftlab.methods.state import load_trainable_state, save_peft_model

if TYPE_CHECKING:
    import numpy as np
    import paddle

    from ftlab.config.environment import Environment
    from ftlab.config.schema import ModelConfig, RunConfig
    from ftlab.models.arch import Linear

VERA_RECORD = "ftlab_vera.json"


@dataclass
class VeraMethodConfig(MethodConfig):
    name: str = "vera"
    # Rank of the shared frozen projections. Only d (rank) and b (out) train per layer, so
    # VeRA uses far higher ranks than LoRA (the paper: 256-1024 on large models).
    vera_rank: int = 64
    vera_d_init: float = 0.1  # initial value of every d entry (b starts at 0)
    vera_seed: int = 0  # seed of the frozen projections; recorded and regenerated on load
    vera_dropout: float = 0.0
    target_modules: list[str] | None = None  # None -> model.lora_target_modules


def shared_projections(seed: int, rank: int, max_in: int, max_out: int) -> tuple[np.ndarray, ...]:
    """The frozen A ``[max_in, rank]`` and B ``[rank, max_out]``: Kaiming-uniform, seeded.

    The bound ``1/sqrt(fan_in)`` is ``nn.initializer.KaimingUniform(negative_slope=sqrt(5))``,
    LoRA's usual init for A.
    """
    import numpy as np

    rs = np.random.RandomState(seed)
    a = rs.uniform(-1.0, 1.0, size=(max_in, rank)) / np.sqrt(max_in)
    b = rs.uniform(-1.0, 1.0, size=(rank, max_out)) / np.sqrt(rank)
    return a.astype(np.float32), b.astype(np.float32)


def vera_layers(model: Any) -> list[tuple[str, Any]]:
    from paddlenlp.peft.vera.vera_layers import VeRALinear

    return [(n, layer) for n, layer in model.named_sublayers() if isinstance(layer, VeRALinear)]


def projections_digest(model: Any) -> str:
    """SHA-256 over every layer's frozen A and B, in layer order (what reload must match)."""
    h = hashlib.sha256()
    for name, layer in vera_layers(model):
        h.update(name.encode())
        h.update(layer.vera_A.numpy().tobytes())
        h.update(layer.vera_B.numpy().tobytes())
    return h.hexdigest()


@functools.cache
def _vera_model_class() -> type:
    from paddlenlp.peft import VeRAModel

    class FtlabVeRAModel(VeRAModel):
        """VeRAModel with seeded frozen projections that its checkpoints can rebuild."""

        def __init__(self, model: Any, vera_config: Any, seed: int, d_init: float) -> None:
            super().__init__(model, vera_config)
            self.vera_seed = seed
            self.vera_d_init = d_init
            self._init_vera(seed, d_init)
            self.mark_only_vera_as_trainable()

        def _init_vera(self, seed: int, d_init: float) -> None:
            import paddle

            layers = vera_layers(self.model)
            if not layers:
                raise ConfigError(
                    "method=vera: no linear layer matches method.target_modules "
                    f"{self.vera_config.target_modules}."
                )
            rank = self.vera_config.r
            max_in = max(layer.weight.shape[0] for _, layer in layers)
            max_out = max(layer.weight.shape[1] for _, layer in layers)
            a, b = shared_projections(seed, rank, max_in, max_out)
            with paddle.no_grad():
                for _, layer in layers:
                    n_in, n_out = layer.weight.shape
                    dtype = layer.vera_A.dtype
                    layer.vera_A.set_value(paddle.to_tensor(a[:n_in]).astype(dtype))
                    layer.vera_B.set_value(paddle.to_tensor(b[:, :n_out]).astype(dtype))
                    layer.vera_b.set_value(paddle.zeros_like(layer.vera_b))
                    layer.vera_d.set_value(paddle.full_like(layer.vera_d, d_init))

        def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
            import paddle

            save_peft_model(self, save_directory, self.vera_config, **kwargs)
            if kwargs.get("is_main_process", paddle.distributed.get_rank() == 0):
                record = {
                    "vera_seed": self.vera_seed,
                    "vera_d_init": self.vera_d_init,
                    "projections_sha256": projections_digest(self.model),
                }
                (Path(save_directory) / VERA_RECORD).write_text(json.dumps(record, indent=2))

    return FtlabVeRAModel


@register_method
class Vera(LinearAdapterMethod):
    name = "vera"
    schema = VeraMethodConfig
    argument_flag = "vera"
    argument_keys = {"vera_rank": "vera_rank"}
    unified_checkpoint = False
    supports_tensor_parallel = False
    # The seed regenerates the frozen projections the trained vectors belong to.
    fixed_on_resume = ("vera_rank", "vera_seed", "target_modules")
    size_setting = "vera_rank"
    plan_label = "VeRA rank"

    def check(self, run: RunConfig, env: Environment) -> None:
        m = run.method
        if m.vera_rank < 1:
            raise ConfigError(f"method.vera_rank={m.vera_rank}: must be >= 1.")
        super().check(run, env)
        if m.vera_d_init == 0:
            raise ConfigError(
                "method.vera_d_init=0: with b starting at 0 as well, neither vector would ever "
                "get a gradient. Use a small non-zero value such as 0.1."
            )

    def apply(
        self, model: paddle.nn.Layer, cfg: VeraMethodConfig, model_cfg: ModelConfig
    ) -> paddle.nn.Layer:
        from paddlenlp.peft import VeRAConfig

        config = VeRAConfig(
            target_modules=target_patterns(cfg, model_cfg),
            r=cfg.vera_rank,
            vera_alpha=cfg.vera_rank,  # scale 1
            vera_dropout=cfg.vera_dropout,
            dtype=model.config.dtype,
            base_model_name_or_path=model_cfg.name_or_path,
        )
        return _vera_model_class()(model, config, cfg.vera_seed, cfg.vera_d_init)

    def load(
        self, base: paddle.nn.Layer, trained_dir: Path, cfg: VeraMethodConfig | None = None
    ) -> paddle.nn.Layer:
        from paddlenlp.peft import VeRAConfig

        trained_dir = Path(trained_dir)
        record_path = trained_dir / VERA_RECORD
        if not record_path.exists():
            raise ModelLoadError(
                f"{trained_dir} lacks {VERA_RECORD}: it was not saved by ftlab's vera method, "
                "so its frozen random projections cannot be rebuilt."
            )
        record = json.loads(record_path.read_text())
        config = VeRAConfig.from_pretrained(str(trained_dir))
        model = _vera_model_class()(base, config, record["vera_seed"], record["vera_d_init"])
        digest = projections_digest(model.model)
        if digest != record["projections_sha256"]:
            raise ModelLoadError(
                f"VeRA projections regenerated from vera_seed={record['vera_seed']} differ from "
                f"the trained ones (sha256 {digest[:12]} != {record['projections_sha256'][:12]}): "
                "the target modules or the base model's shapes differ from training."
            )
        load_trainable_state(model, trained_dir)
        return model

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        from paddlenlp.peft.vera.vera_layers import VeRALinear

        def delta(layer: Any) -> Any:
            if not isinstance(layer, VeRALinear):
                return None
            # diag(d) and diag(b) as broadcasts: (A * d) @ (B * b) * scale.
            return (layer.vera_A * layer.vera_d) @ (layer.vera_B * layer.vera_b) * layer.scaling

        inner = model.model
        fold_linear_adapters(inner, delta, "VeRA")
        return inner

    def size_limit(self, cfg: VeraMethodConfig, linear: Linear) -> tuple[int, str]:
        # The update diag(b) B diag(d) A is a combination of vera_rank fixed rank-one
        # matrices weighted by d; unlike LoRA's rank, a rank above the layer's smaller side
        # still adds directions, up to the matrix's number of entries.
        return linear.fan_in * linear.fan_out, "the number of weights (in x out)"

    def adapter_size(self, cfg: VeraMethodConfig, linear: Linear) -> int:
        return cfg.vera_rank + linear.fan_out  # the vectors d and b

    def frozen_size(self, cfg: VeraMethodConfig, linear: Linear) -> int:
        return cfg.vera_rank * (linear.fan_in + linear.fan_out)  # this layer's A and B

    def export(self, run: RunConfig, notes: list[str]) -> dict[str, Any]:
        notes.append(
            "VeRA: run_finetune.py has only vera_rank; d init, seed, dropout and "
            "targets are its own defaults."
        )
        return self.flag_arguments(run.method)
