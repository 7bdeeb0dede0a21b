"""LoReFT (Wu et al. 2024): low-rank edits of hidden states at chosen prompt positions.

At each configured layer ``l`` and each intervened position, the layer's output ``h``
becomes ``h + R^T (W h + b - R h)`` (``R``: ``[rank, hidden]``, orthogonal init; ``W``,
``b``: a learned projection); the base model stays frozen. Positions follow the ReFT
convention ``f<n>+l<m>``: the first ``n`` and the last ``m`` tokens of each prompt (their
union when the prompt is shorter than ``n + m``).

Why ftlab has its own wrapper instead of ``paddlenlp.peft.ReFTModel``: the wheel lacks
the intervention-location helper (it lives in PaddleNLP's llm/ scripts) and expects the
data pipeline to add ``intervention_locations`` to every batch; its interventions are
not registered sublayers (``parameters()`` lists only trainable ones, so the parameter
total is wrong, and ``train()``/``eval()`` do not reach them). Here the positions are
computed from the batch itself (``attention_mask`` gives each row's first real token,
``labels`` the end of the prompt; without labels the whole input is the prompt, which is
what generation feeds), the edit is applied through a 0/1 position mask (no gather /
scatter, so overlapping positions cannot double-count), and it is applied on the prompt
forward only: during generation the cached decoding steps are left untouched.

The wrapper subclasses ``ReFTModel`` only so that PaddleNLP's Trainer saves it through
its ``save_pretrained`` (the Trainer chooses the save path by this type).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import MethodConfig
from ftlab.errors import ConfigError, ModelLoadError
from ftlab.methods.registry import AdapterPlan, Method, register_method
from ftlab.models.loading import decoder_layers, num_layers
from ftlab.models.weights import read_safetensors

if TYPE_CHECKING:
    import numpy as np
    import paddle

    from ftlab.config.environment import Environment
    from ftlab.config.schema import ModelConfig, RunConfig

REFT_RECORD = "ftlab_reft.json"
REFT_WEIGHTS = "reft_interventions.safetensors"
IGNORE_INDEX = -100


# run_finetune.py's name for the LoReFT intervention (the only one ftlab implements).
INTERVENTION = "LoreftIntervention"


@dataclass
class ReftMethodConfig(MethodConfig):
    name: str = "reft"
    reft_layers: list[int] | None = None  # decoder layers to intervene on; None -> all
    reft_positions: str = "f7+l7"  # first n / last m prompt tokens: "f7+l7", "f5", "l3"
    reft_rank: int = 4  # rank of R (and output size of the learned projection W)
    reft_dropout: float = 0.0  # dropout on the edit, training only
    reft_act_fn: str | None = None  # None (linear) | relu, applied to W h + b


_POSITIONS = re.compile(r"^(?:f(\d+))?(?:\+?l(\d+))?$")


def parse_positions(spec: str) -> tuple[int, int]:
    """``"f7+l7"`` -> (7, 7); ``"f5"`` -> (5, 0); ``"l3"`` -> (0, 3)."""
    match = _POSITIONS.match(spec.strip())
    if not spec.strip() or match is None or spec.strip().startswith("+"):
        raise ConfigError(
            f"method.reft_positions={spec!r}: expected 'f<n>+l<m>', 'f<n>' or 'l<m>' "
            "(first n and last m prompt tokens), e.g. 'f7+l7'."
        )
    first, last = (int(g) if g else 0 for g in match.groups())
    if first + last == 0:
        raise ConfigError(f"method.reft_positions={spec!r} selects no position.")
    return first, last


def intervention_mask(
    attention_mask: np.ndarray | None,
    labels: np.ndarray | None,
    shape: tuple[int, int],
    first: int,
    last: int,
) -> np.ndarray:
    """``[batch, seq]`` 0/1 mask of the positions to intervene on.

    Row ``b``'s prompt starts at its first real token (``attention_mask`` 1; left padding
    shifts it) and ends just before the first position whose label is not ignored: with
    labels already shifted (``labels[i]`` is the token after ``input_ids[i]``), the last
    prompt token is the one whose label is the first target token. Without labels, or in
    a row with no target, every real token is prompt.
    """
    import numpy as np

    batch, seq = shape
    valid = np.ones(shape, dtype=bool) if attention_mask is None else attention_mask != 0
    if valid.shape != tuple(shape):
        raise ValueError(
            f"ReFT needs a [batch, seq] attention mask; got shape {valid.shape} (packed "
            "batches are not supported: set data.packing=none)."
        )
    mask = np.zeros(shape, dtype=np.float32)
    for b in range(batch):
        real = np.flatnonzero(valid[b])
        if real.size == 0:
            continue
        start, end = int(real[0]), int(real[-1]) + 1
        if labels is not None:
            targets = np.flatnonzero(labels[b] != IGNORE_INDEX)
            if targets.size:
                end = int(targets[0]) + 1
        length = end - start
        mask[b, start : start + min(first, length)] = 1.0
        mask[b, end - min(last, length) : end] = 1.0
    return mask


@functools.cache
def _reft_classes() -> tuple[type, type]:
    import paddle
    from paddle import nn
    from paddlenlp.peft import ReFTModel

    class LoReftIntervention(nn.Layer):
        """The edit ``R^T (act(W h + b) - R h)`` (added to ``h`` by the wrapper)."""

        def __init__(self, hidden: int, rank: int, dropout: float, act_fn: str | None) -> None:
            super().__init__()
            # Columns of ``rotate`` are the rows of R: h @ rotate = R h.
            self.rotate = self.create_parameter(
                [hidden, rank], default_initializer=nn.initializer.Orthogonal()
            )
            self.source = nn.Linear(hidden, rank)
            self.dropout = nn.Dropout(dropout)
            self.act = nn.ReLU() if act_fn == "relu" else None

        def forward(self, h: paddle.Tensor) -> paddle.Tensor:
            learned = self.source(h)
            if self.act is not None:
                learned = self.act(learned)
            return self.dropout((learned - h @ self.rotate) @ self.rotate.T)

    class FtlabReftModel(ReFTModel):
        """A frozen causal LM with LoReFT edits on selected layers' outputs."""

        named_parameters = nn.Layer.named_parameters  # ReFTModel's lists trainable ones only
        train = nn.Layer.train
        eval = nn.Layer.eval

        def __init__(self, model: Any, settings: dict[str, Any]) -> None:
            nn.Layer.__init__(self)  # ReFTModel.__init__ keeps interventions off the tree
            self.model = model
            self.config = model.config
            self.settings = dict(settings)
            hidden = model.config.hidden_size
            self.interventions = nn.LayerDict(
                {
                    str(i): LoReftIntervention(
                        hidden, settings["rank"], settings["dropout"], settings["act_fn"]
                    )
                    for i in settings["layers"]
                }
            )
            for p in self.model.parameters():
                p.stop_gradient = True
            self._pending: paddle.Tensor | None = None
            self._active: paddle.Tensor | None = None
            decoder = decoder_layers(model)
            for i in settings["layers"]:
                decoder[i].register_forward_post_hook(self._edit_hook(str(i)))
            # Arm the edits for exactly one forward of the wrapped model (the prompt pass).
            model.register_forward_pre_hook(self._activate)
            model.register_forward_post_hook(self._deactivate)

        def _activate(self, layer: Any, inputs: Any) -> None:
            self._active, self._pending = self._pending, None

        def _deactivate(self, layer: Any, inputs: Any, outputs: Any) -> None:
            self._active = None

        def _edit_hook(self, key: str) -> Any:
            def hook(layer: Any, inputs: Any, outputs: Any) -> Any:
                mask = self._active
                if mask is None:
                    return None
                hidden = outputs[0] if isinstance(outputs, tuple) else outputs
                if hidden.shape[:2] != mask.shape[:2]:
                    raise RuntimeError(
                        f"ReFT position mask {mask.shape[:2]} does not match layer output "
                        f"{hidden.shape[:2]}"
                    )
                edited = hidden + self.interventions[key](hidden) * mask.astype(hidden.dtype)
                return (edited, *outputs[1:]) if isinstance(outputs, tuple) else edited

            return hook

        def _arm(self, input_ids: Any, attention_mask: Any, labels: Any) -> None:
            mask_np = None if attention_mask is None else _numpy(attention_mask)
            labels_np = None if labels is None else _numpy(labels)
            mask = intervention_mask(
                mask_np,
                labels_np,
                tuple(input_ids.shape),
                self.settings["first"],
                self.settings["last"],
            )
            self._pending = paddle.to_tensor(mask[:, :, None])

        def forward(
            self, input_ids: Any, attention_mask: Any = None, labels: Any = None, **kwargs: Any
        ) -> Any:
            self._arm(input_ids, attention_mask, labels)
            try:
                return self.model(
                    input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
                )
            finally:
                self._pending = self._active = None

        def generate(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
            self._arm(input_ids, attention_mask, None)
            try:
                return self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, **kwargs
                )
            finally:
                self._pending = self._active = None

        def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
            from safetensors.numpy import save_file

            if not kwargs.get("is_main_process", paddle.distributed.get_rank() == 0):
                return
            out = Path(save_directory)
            out.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.numpy() for k, v in self.interventions.state_dict().items()}
            save_file(tensors, str(out / REFT_WEIGHTS), metadata={"format": "np"})
            (out / REFT_RECORD).write_text(json.dumps(self.settings, indent=2))
            self.model.config.save_pretrained(str(out))

    return LoReftIntervention, FtlabReftModel


def _numpy(x: Any) -> np.ndarray:
    import numpy as np

    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def reft_settings(cfg: ReftMethodConfig, num_layers: int) -> dict[str, Any]:
    """The resolved settings a saved ReFT adapter records (all a reload needs)."""
    first, last = parse_positions(cfg.reft_positions)
    layers = list(range(num_layers)) if cfg.reft_layers is None else list(cfg.reft_layers)
    return {
        "layers": layers,
        "positions": cfg.reft_positions,
        "first": first,
        "last": last,
        "rank": cfg.reft_rank,
        "dropout": cfg.reft_dropout,
        "act_fn": cfg.reft_act_fn,
    }


@register_method
class Reft(Method):
    name = "reft"
    schema = ReftMethodConfig
    argument_flag = "reft"
    # The keys run_finetune.py's ReftArgument shares with ftlab unchanged; its layers,
    # intervention type and activation are spelled differently (export / import_arguments).
    argument_keys = {"position": "reft_positions", "rank": "reft_rank", "dropout": "reft_dropout"}
    unified_checkpoint = False
    supports_tensor_parallel = False
    fixed_on_resume = ("reft_layers", "reft_positions", "reft_rank", "reft_act_fn")
    size_setting = "reft_rank"
    preference_unsupported = (
        "ReFT finds each prompt from a batch's 2-D attention mask and its labels, and a "
        "preference row holds a prompt and two responses under a 3-D mask with one label "
        "row per response, so its intervention positions are undefined there"
    )
    merge_unsupported = (
        "ReFT edits hidden states at chosen prompt positions only, by an amount that "
        "depends on the input; a weight matrix acts on every position alike, so no merged "
        "weights can reproduce it. Serve the base model with the interventions instead "
        "(ftlab.methods.reopen.load_trained)."
    )

    def check(self, run: RunConfig, env: Environment) -> None:
        m, n_layers = run.method, run.model.arch.num_hidden_layers
        if run.resume:
            # PaddleNLP's resume reloads a ReFT checkpoint into a fresh object and drops
            # it, so the interventions would silently restart from scratch.
            raise ConfigError(
                "resume= with method=reft: PaddleNLP's checkpoint resume does not restore "
                "ReFT interventions. Start a new run (rerun=) instead."
            )
        parse_positions(m.reft_positions)
        if not 0.0 <= m.reft_dropout < 1.0:
            raise ConfigError(f"method.reft_dropout={m.reft_dropout}: must be in [0, 1).")
        if not 1 <= m.reft_rank <= run.model.arch.hidden_size:
            raise ConfigError(
                f"method.reft_rank={m.reft_rank}: must be between 1 and the hidden size "
                f"({run.model.arch.hidden_size})."
            )
        if m.reft_layers is not None:
            bad = [i for i in m.reft_layers if not 0 <= i < n_layers]
            if bad or not m.reft_layers or len(set(m.reft_layers)) != len(m.reft_layers):
                raise ConfigError(
                    f"method.reft_layers={list(m.reft_layers)}: need distinct layer indices in "
                    f"0..{n_layers - 1} (model {run.model.name} has {n_layers} layers), or null "
                    "for all."
                )
        if m.reft_act_fn not in (None, "relu"):
            raise ConfigError(f"method.reft_act_fn={m.reft_act_fn!r}: choose null or 'relu'.")
        if not 0.0 <= m.reft_dropout < 1.0:
            raise ConfigError(f"method.reft_dropout={m.reft_dropout}: must be in [0, 1).")
        if run.data.packing != "none":
            raise ConfigError(
                f"method=reft with data.packing={run.data.packing}: interventions sit at each "
                "prompt's first/last tokens, found per row; packed rows hold several prompts. "
                "Set data.packing=none."
            )
        if run.train.recompute:
            raise ConfigError(
                "method=reft with train.recompute=true: recomputation re-runs the decoder "
                "layers outside the forward pass the interventions are armed for, so the "
                "gradients would be wrong. Set train.recompute=false."
            )

    def apply(
        self, model: paddle.nn.Layer, cfg: ReftMethodConfig, model_cfg: ModelConfig
    ) -> paddle.nn.Layer:
        settings = reft_settings(cfg, num_layers(model.config))
        return _reft_classes()[1](model, settings)

    def load(
        self, base: paddle.nn.Layer, trained_dir: Path, cfg: ReftMethodConfig | None = None
    ) -> paddle.nn.Layer:
        import paddle

        trained_dir = Path(trained_dir)
        record, weights = trained_dir / REFT_RECORD, trained_dir / REFT_WEIGHTS
        if not record.exists() or not weights.exists():
            raise ModelLoadError(
                f"no ReFT interventions ({REFT_RECORD}, {REFT_WEIGHTS}) in {trained_dir}"
            )
        settings = json.loads(record.read_text())

        n_layers = num_layers(base.config)
        if any(not 0 <= i < n_layers for i in settings["layers"]):
            raise ModelLoadError(
                f"the interventions in {trained_dir} sit on layers {settings['layers']} but "
                f"this base model has {n_layers} layers. Load them onto their own base model."
            )
        model = _reft_classes()[1](base, settings)
        state = read_safetensors(weights)
        expected = set(model.interventions.state_dict())
        if set(state) != expected:
            raise ModelLoadError(
                f"{weights} holds {sorted(state)[:3]}... but the interventions expect "
                f"{sorted(expected)[:3]}...; the file does not match {REFT_RECORD}."
            )
        model.interventions.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        return model

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        raise ConfigError(f"method=reft cannot be merged: {self.merge_unsupported}")

    def derived(self, cfg: ReftMethodConfig) -> dict[str, Any]:
        first, last = parse_positions(cfg.reft_positions)
        return {"reft_first_positions": first, "reft_last_positions": last}

    def plan(self, run: RunConfig) -> AdapterPlan:
        """Per intervened layer: R (``[hidden, rank]``) and the projection W, b."""
        m, a = run.method, run.model.arch
        layers = reft_settings(m, a.num_hidden_layers)["layers"]
        per_layer = 2 * a.hidden_size * m.reft_rank + m.reft_rank
        return AdapterPlan(
            adapter=len(layers) * per_layer,
            details={"reft_rank": m.reft_rank, "reft_layers": layers},
            lines=[f"adapter        LoReFT rank {m.reft_rank} on {len(layers)} layer(s)"],
        )

    def export(self, run: RunConfig, notes: list[str]) -> dict[str, Any]:
        m = run.method
        layers = "all" if m.reft_layers is None else ";".join(str(x) for x in m.reft_layers)
        return {
            **self.flag_arguments(m),
            "layers": layers,
            "intervention_type": INTERVENTION,
            "act_fn": m.reft_act_fn or "linear",
        }

    def import_arguments(
        self, args: Mapping[str, Any], model: ModelConfig, notes: list[str]
    ) -> tuple[dict[str, Any], set[str]] | None:
        found = super().import_arguments(args, model, notes)
        if found is None or args.get("intervention_type", INTERVENTION) != INTERVENTION:
            return None  # another intervention is not ftlab's LoReFT: the keys stay listed
        settings, keys = found
        layers = str(args.get("layers", "all"))
        settings["reft_layers"] = (
            None if layers == "all" else [int(x) for x in layers.replace(",", ";").split(";")]
        )
        settings["reft_act_fn"] = (
            None if args.get("act_fn", "linear") == "linear" else args["act_fn"]
        )
        return settings, keys | {"layers", "intervention_type", "act_fn"}
