"""The method zoo on the shipped stories260K model: train, save, reload, merge.

Every method trains 4 steps at a high learning rate on four demo examples through ftlab's
own Trainer and saving path (``Method.save_final``), so the adapters are far from their
initial values. Then: (a) the base model + the saved directory gives the trained model's
logits; (b) ``ftlab-merge`` writes a plain model whose logits match and which
``AutoModelForCausalLM.from_pretrained`` loads; (c) prefix tuning and ReFT refuse to
merge with the reason; (d) the loss went down; and the trainable-parameter count is the
one computed by hand from the shapes (stories260K: hidden 64, 5 layers, 8 query / 4
key-value heads of size 8, MLP 172).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    CPU,
    TRAIN,
    collate,
    compose_run,
    logits_of,
    trainer_for,
    without_paddle_vars,
)

from ftlab.errors import ConfigError, ModelLoadError
from ftlab.resolve.validate import validate

RELOAD_TOL = 1e-5
MERGE_TOL = 1e-4
BASE_PARAMS = 260_032  # stories260K, tied embeddings counted once
# Per decoder layer, (in, out) of q, k, v, o, gate, up, down.
SHAPES = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 172), (64, 172), (172, 64)]


def lora_count(r: int) -> int:
    return 5 * sum(r * (i + o) for i, o in SHAPES)


def mora_count(r: int) -> int:
    # MoRA's square matrix: side int(sqrt((in + out) * r) + 0.5) rounded down to even.
    return 5 * sum((int(((i + o) * r) ** 0.5 + 0.5) // 2 * 2) ** 2 for i, o in SHAPES)


# name -> (overrides, expected trainable parameters)
METHODS: dict[str, tuple[list[str], int]] = {
    "lora": ([], lora_count(8)),  # 46,240
    "rslora": (["method.rslora=true"], lora_count(8)),
    "lora_plus": (["method.lora_plus_scale=4"], lora_count(8)),
    "pissa": (["method.pissa=true"], lora_count(8)),
    "moslora": (["method.lora_use_mixer=true"], lora_count(8) + 5 * 7 * 8 * 8),  # + r x r
    "mora": (["method.use_mora=true"], mora_count(8)),  # 44,540
    # 16 tokens x 5 layers x (key + value) x 4 kv heads x head size 8
    "prefix": (["method=prefix"], 16 * 5 * 2 * 4 * 8),
    # per layer: b (out) + d (rank 64)
    "vera": (["method=vera"], 5 * sum(o + 64 for _, o in SHAPES)),
    # w1 (out_m x in_m) and w2 (full, or low-rank 8 when its side is 43): 64 = 8 x 8,
    # 32 = 4 x 8, 172 = 4 x 43 -> q/o 64+64, k/v 32+64, gate/up 32 + 43*8+8*8, down alike
    "lokr": (["method=lokr"], 5 * (2 * 128 + 2 * 96 + 3 * (32 + 344 + 64))),
    # per layer: R (64 x 4) + W (64 x 4) + b (4)
    "reft": (["method=reft"], 5 * (2 * 64 * 4 + 4)),
}


def train_and_save(
    overrides: list[str], run_dir: Path, examples: list[dict], tokenizer: Any
) -> tuple[Any, Any, dict[str, int], list[float]]:
    """Train with FtlabTrainer, then save ``final/`` as the runner does."""
    from ftlab.models.loading import parameter_counts
    from ftlab.record.rundir import RunDir
    from ftlab.training.trainer import MetricsJsonl

    run = compose_run([*overrides, *TRAIN])
    validate(run, CPU)
    callbacks = [MetricsJsonl(RunDir(run_dir))]
    method, model, trainer = trainer_for(run, run_dir, examples, tokenizer, callbacks)
    params = parameter_counts(model)
    trainer.train()
    logged = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    losses = [x["loss"] for x in logged if x["kind"] == "train"]
    final = run_dir / "final"
    method.save_final(trainer, model, final)
    tokenizer.save_pretrained(str(final))
    (final / "ftlab_method.json").write_text(
        json.dumps({"method": run.method.name, "base_model": run.model.name_or_path})
    )
    return run, model, params, losses


@dataclass
class Trained:
    run: Any
    model: Any
    params: dict[str, int]
    losses: list[float]
    run_dir: Path

    @property
    def final(self) -> Path:
        return self.run_dir / "final"


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, examples: list[dict], tokenizer: Any
) -> Callable[[str], Trained]:
    """Each method trained once per module (several tests look at the same run)."""
    cache: dict[str, Trained] = {}

    def get(key: str) -> Trained:
        if key not in cache:
            run_dir = tmp_path_factory.mktemp(key)
            cache[key] = Trained(
                *train_and_save(METHODS[key][0], run_dir, examples, tokenizer), run_dir
            )
        return cache[key]

    return get


@pytest.mark.parametrize("key", list(METHODS))
def test_method_trains_reloads_and_merges(
    key: str,
    tmp_path: Path,
    examples: list[dict],
    tokenizer: Any,
    trained: Callable[[str], Trained],
    capsys: pytest.CaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    from paddlenlp.transformers import AutoModelForCausalLM

    from ftlab.cli.merge import main as merge_main
    from ftlab.methods.catalog import get_method
    from ftlab.methods.reopen import load_adapter
    from ftlab.models.loading import finish_model, load_model
    from ftlab.planning.plan import count_parameters

    t = trained(key)
    expected = METHODS[key][1]
    assert t.params == {"total": BASE_PARAMS + expected + frozen_extra(key), "trainable": expected}
    planned = count_parameters(t.run)  # from model.arch alone, no Paddle
    assert {"total": planned.total, "trainable": planned.trainable} == t.params
    assert len(t.losses) == 4 and t.losses[-1] < t.losses[0] - 0.005, t.losses  # (d)

    batch = collate(tokenizer, examples)
    reference = logits_of(t.model, batch)
    # Reloading and merging need weights and configs only: any unpickling fails the test
    # (a run dir from someone else must not run code).
    request.getfixturevalue("no_unpickling")
    reloaded = load_adapter(load_model(t.run.model, "float32"), t.final, t.run.method.name)
    assert np.abs(logits_of(reloaded, batch) - reference).max() <= RELOAD_TOL  # (a)

    out = tmp_path / "merged"
    argv = ["--base", t.run.model.name_or_path, "--adapter", str(t.final), "--out", str(out)]
    if get_method(t.run.method.name).merge_unsupported is not None:  # (c)
        assert merge_main(argv) == 2
        err = capsys.readouterr().err
        assert f"a {t.run.method.name} model cannot be merged into its base" in err
        assert "no merged weights can reproduce" in err
        assert not out.exists()
        return
    assert merge_main(argv) == 0  # (b)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    base_keys = set(load_model(t.run.model, "float32").state_dict())
    assert set(merged.state_dict()) == base_keys  # a plain model: no adapter tensors left
    assert list(out.glob("*.safetensors"))
    finish_model(merged)  # the layers ftlab computes the reference with: merge error alone
    assert np.abs(logits_of(merged, batch) - reference).max() <= MERGE_TOL
    assert json.loads((out / "ftlab_merged.json").read_text())["method"] == t.run.method.name


def frozen_extra(key: str) -> int:
    """Frozen parameters a method adds: VeRA's per-layer copies of its random A and B."""
    if key != "vera":
        return 0
    return 5 * sum(64 * i + 64 * o for i, o in SHAPES)


def one_trainer_step(
    overrides: list[str], run_dir: Path, examples: list[dict], tokenizer: Any
) -> Any:
    run = compose_run([*overrides, *TRAIN, "train.max_steps=1"])
    _, model, trainer = trainer_for(run, run_dir, examples, tokenizer, save_checkpoints=False)
    trainer.train()
    return model


def test_lora_plus_scales_lora_b_learning_rate_in_the_trainer(
    tmp_path: Path, examples: list[dict], tokenizer: Any
) -> None:
    """One Trainer step from B = 0: Adam moves B by ~lr * scale, and A not at all.

    A's gradient is zero while B is zero, so A stays put; Adam's first update is
    lr * g / (|g| + eps), i.e. +-lr per entry, times LoRA+'s multiplier on B.
    """

    def params(model: Any, kind: str) -> dict[str, np.ndarray]:
        return {n: p.numpy() for n, p in model.named_parameters() if kind in n}

    plain = one_trainer_step([], tmp_path / "plain", examples, tokenizer)
    plus = one_trainer_step(["method.lora_plus_scale=4"], tmp_path / "plus", examples, tokenizer)
    a1, a4 = params(plain, "lora_A"), params(plus, "lora_A")
    assert a1 and all(np.array_equal(a1[n], a4[n]) for n in a1)
    b1, b4 = params(plain, "lora_B"), params(plus, "lora_B")
    assert max(np.abs(v).max() for v in b1.values()) == pytest.approx(1e-2, rel=0.01)
    for n in b1:
        np.testing.assert_allclose(b4[n], 4 * b1[n], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- VeRA


def test_vera_projections_reload_bit_identical(trained: Callable[[str], Trained]) -> None:
    from ftlab.methods.reopen import load_adapter
    from ftlab.methods.vera import vera_layers
    from ftlab.models.loading import load_model

    t = trained("vera")
    reloaded = load_adapter(load_model(t.run.model, "float32"), t.final, "vera")
    before, after = vera_layers(t.model.model), vera_layers(reloaded.model)
    assert [n for n, _ in before] == [n for n, _ in after] and len(before) == 35
    for (_, x), (_, y) in zip(before, after, strict=True):
        assert np.array_equal(x.vera_A.numpy(), y.vera_A.numpy())
        assert np.array_equal(x.vera_B.numpy(), y.vera_B.numpy())
        assert np.array_equal(x.vera_d.numpy(), y.vera_d.numpy())
    # b started at 0 and d at 0.1: both moved, so training reached both vectors.
    _, q = before[0]
    assert np.abs(q.vera_b.numpy()).max() > 0 and not np.allclose(q.vera_d.numpy(), 0.1)


def test_vera_reload_refuses_other_projections(
    tmp_path: Path, trained: Callable[[str], Trained]
) -> None:
    from ftlab.methods.reopen import load_adapter
    from ftlab.models.loading import load_model

    t = trained("vera")
    bad = tmp_path / "final"
    shutil.copytree(t.final, bad)
    record = json.loads((bad / "ftlab_vera.json").read_text())
    (bad / "ftlab_vera.json").write_text(json.dumps({**record, "vera_seed": 1}))
    with pytest.raises(ModelLoadError, match="vera_seed=1 differ from the trained ones"):
        load_adapter(load_model(t.run.model, "float32"), bad, "vera")
    (bad / "ftlab_vera.json").unlink()
    with pytest.raises(ModelLoadError, match="frozen random projections cannot be rebuilt"):
        load_adapter(load_model(t.run.model, "float32"), bad, "vera")


# --------------------------------------------------------------------------- PiSSA


def test_pissa_base_residual_and_raw_checkpoint_refusal(trained: Callable[[str], Trained]) -> None:
    """Training ran on W - A0 @ B0; a Trainer checkpoint (no A0/B0) is refused on reload."""
    from ftlab.methods.lora import lora_layers
    from ftlab.methods.reopen import load_adapter
    from ftlab.models.loading import load_model

    t = trained("pissa")
    base = load_model(t.run.model, "float32")
    original = base.llama.layers[0].self_attn.q_proj.weight.numpy()
    _, q = lora_layers(t.model.model)[0]
    assert not np.allclose(q.weight.numpy(), original, atol=1e-3)  # the residual, not W
    checkpoint = t.run_dir / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "lora_config.json").is_file()
    with pytest.raises(ModelLoadError, match="PiSSA adapter without pissa_init.safetensors"):
        load_adapter(base, checkpoint, "lora")


# --------------------------------------------------------------------------- ReFT


@pytest.mark.fast
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("f7+l7", (7, 7)),
        ("f5", (5, 0)),
        ("l3", (0, 3)),
        ("f1+l2", (1, 2)),
    ],
)
def test_reft_positions_parse(spec: str, expected: tuple[int, int]) -> None:
    from ftlab.methods.reft import parse_positions

    assert parse_positions(spec) == expected


@pytest.mark.fast
@pytest.mark.parametrize("spec", ["", "x7", "f7+", "+l2", "f0", "l7+f7", "f-1"])
def test_reft_bad_positions_fail(spec: str) -> None:
    from ftlab.methods.reft import parse_positions

    with pytest.raises(ConfigError, match="reft_positions"):
        parse_positions(spec)


@pytest.mark.fast
def test_reft_intervention_mask() -> None:
    from ftlab.methods.reft import intervention_mask

    # Right padding, shifted labels: 5 prompt tokens (labels[4] is the first target).
    attn = np.array([[1] * 8 + [0]])
    labels = np.array([[-100] * 4 + [9] * 4 + [-100]])
    assert intervention_mask(attn, labels, (1, 9), 2, 1).tolist() == [[1, 1, 0, 0, 1, 0, 0, 0, 0]]
    # Left padding, no labels (generation): the whole real input is the prompt.
    attn = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    assert intervention_mask(attn, None, (1, 9), 2, 2).tolist() == [[0, 0, 0, 1, 1, 0, 0, 1, 1]]
    # A prompt shorter than first + last: the union, each position once.
    attn, labels = np.ones((1, 5)), np.array([[-100, -100, 3, 4, 5]])
    assert intervention_mask(attn, labels, (1, 5), 2, 2).tolist() == [[1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="data.packing=none"):
        intervention_mask(np.ones((1, 5, 5)), None, (1, 5), 1, 1)


def test_reft_edits_only_from_the_intervened_position(examples: list[dict], tokenizer: Any) -> None:
    """With 'l1' only the last prompt token is edited: earlier logits equal the base's."""
    import paddle

    from ftlab.methods.catalog import get_method
    from ftlab.models.loading import load_model

    run = compose_run(["method=reft", "method.reft_positions=l1"])
    base_logits = logits_of(load_model(run.model, "float32"), collate(tokenizer, examples[:1]))
    paddle.seed(0)
    model = get_method("reft").apply(load_model(run.model, "float32"), run.method, run.model)
    batch = collate(tokenizer, examples[:1])
    with paddle.no_grad():
        out = model(**{k: paddle.to_tensor(v) for k, v in batch.items()})
    got = out[1].numpy()  # (loss, logits) with labels
    last = int(np.flatnonzero(batch["labels"][0] != -100)[0])  # the last prompt token
    np.testing.assert_array_equal(got[0, :last], base_logits[0, :last])
    assert np.abs(got[0, last:] - base_logits[0, last:]).max() > 1e-3


def test_reft_generation_batched_equals_one_by_one(
    tokenizer: Any, trained: Callable[[str], Trained]
) -> None:
    """Left padding moves each prompt; the positions follow it, as batching must not matter."""
    from ftlab.assets import asset_path
    from ftlab.evaluation.generation import generate_texts
    from ftlab.models.loading import load_model

    t = trained("reft")
    dev = (asset_path("demo_stories") / "dev.json").read_text().splitlines()
    prompts = [json.loads(x)["src"] for x in dev[:3]]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # padding happens
    batched = generate_texts(t.model, tokenizer, prompts, batch_size=3, max_new_tokens=12)
    single = [
        generate_texts(t.model, tokenizer, [p], batch_size=1, max_new_tokens=12)[0] for p in prompts
    ]
    assert batched == single
    base = generate_texts(
        load_model(t.run.model, "float32"), tokenizer, prompts, batch_size=3, max_new_tokens=12
    )
    assert base != batched  # the interventions act during generation


# --------------------------------------------------------------------------- NEFTune


def test_neftune_noise_training_only_with_documented_scale() -> None:
    """Uniform noise in [-s, s], s = alpha / sqrt(seq_len * hidden), in training mode only."""
    import paddle

    from ftlab.methods.neftune import add_neftune_hook
    from ftlab.models.loading import load_model

    model = load_model(compose_run().model, "float32")
    embeddings = model.get_input_embeddings()
    ids = paddle.randint(3, 512, shape=[8, 100])
    plain = embeddings(ids).numpy()
    handle = add_neftune_hook(model, alpha=5.0)
    embeddings.eval()
    np.testing.assert_array_equal(embeddings(ids).numpy(), plain)
    embeddings.train()
    noise = embeddings(ids).numpy() - plain
    scale = 5.0 / np.sqrt(100 * 64)
    assert np.abs(noise).max() <= scale * (1 + 1e-5)
    assert np.abs(noise).max() > 0.99 * scale
    assert abs(noise.mean()) < 0.02 * scale
    assert noise.std() == pytest.approx(scale / np.sqrt(3), rel=0.02)  # uniform's std
    handle.remove()
    np.testing.assert_array_equal(embeddings(ids).numpy(), plain)


def test_full_finetuning_final_dir_reloads_without_unpickling(
    examples: list[dict], tokenizer: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``method=full`` saves the whole model through the Trainer: ftlab-predict and
    ftlab-merge reload it from safetensors alone (no code runs from a run dir)."""
    from ftlab.methods.reopen import load_with_adapter

    run, model, _, _ = train_and_save(["method=full"], tmp_path, examples, tokenizer)
    batch = collate(tokenizer, examples)
    reference = logits_of(model, batch)
    request.getfixturevalue("no_unpickling")
    reloaded, _ = load_with_adapter(run.model.name_or_path, tmp_path / "final")
    assert np.abs(logits_of(reloaded, batch) - reference).max() <= RELOAD_TOL


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("key", ["vera", "lokr"])
def test_adapter_checkpoints_are_safetensors_and_resume_loads_them(
    key: str,
    trained: Callable[[str], Trained],
    examples: list[dict],
    tokenizer: Any,
    tmp_path: Path,
) -> None:
    """VeRA and LoKr checkpoints hold their tensors in safetensors, not pickles; a resume
    reads ftlab's safetensors (PaddleNLP would silently load nothing without its
    pickle), and the RNG and scheduler states are JSON."""
    from ftlab.methods.state import ADAPTER_STATE

    t = trained(key)
    checkpoint = t.run_dir / "checkpoints" / "checkpoint-4"
    names = {p.name for p in checkpoint.iterdir()}
    assert {ADAPTER_STATE, "rng_state.rank0.json", "scheduler.json"} <= names
    assert not [n for n in names if n.endswith((".pdparams", ".pth"))], names
    assert ADAPTER_STATE in {p.name for p in t.final.iterdir()}
    _, fresh, trainer = trainer_for(t.run, tmp_path, examples, tokenizer)
    trained_state = t.model.get_trainable_state_dict()
    assert any(
        not np.array_equal(v.numpy(), trained_state[k].numpy())
        for k, v in fresh.get_trainable_state_dict().items()
    )
    trainer._load_from_peft_checkpoint(str(checkpoint))
    for k, v in fresh.get_trainable_state_dict().items():
        np.testing.assert_array_equal(v.numpy(), trained_state[k].numpy())


# --------------------------------------------------------------------------- loading


def test_load_trained_and_merge_from_run_dir(
    examples: list[dict],
    tokenizer: Any,
    trained: Callable[[str], Trained],
    capsys: pytest.CaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    from ftlab.cli.merge import main as merge_main
    from ftlab.methods.reopen import load_trained, load_with_adapter
    from ftlab.resolve.compose import resolved_config_yaml

    t = trained("lora")
    (t.run_dir / "resolved_config.yaml").write_text(resolved_config_yaml(t.run, {}))
    batch = collate(tokenizer, examples)
    reference = logits_of(t.model, batch)
    request.getfixturevalue("no_unpickling")  # a run dir is read without unpickling
    model, tok = load_trained(t.run_dir)
    assert tok.pad_token == "<unk>"
    assert np.abs(logits_of(model, batch) - reference).max() <= RELOAD_TOL
    model, _ = load_with_adapter(t.run.model.name_or_path, t.final)
    assert np.abs(logits_of(model, batch) - reference).max() <= RELOAD_TOL
    assert merge_main([str(t.run_dir)]) == 0
    assert (t.run_dir / "merged" / "model.safetensors").is_file() or list(
        (t.run_dir / "merged").glob("model-*.safetensors")
    )
    assert merge_main([str(t.run_dir)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.fast
def test_load_refuses_dirs_without_weights(tmp_path: Path) -> None:
    from ftlab.methods.reopen import load_trained, method_of

    with pytest.raises(ModelLoadError, match="no final/ftlab_method.json"):
        load_trained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a directory ftlab saved"):
        method_of(tmp_path)


# --------------------------------------------------------------------------- settings


@pytest.mark.fast
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.pissa=true", "method.lora_use_mixer=true"], "cannot be combined"),
        (["method.use_mora=true", "method.lora_plus_scale=4"], "MoRA has one square matrix"),
        (["method.lora_plus_scale=0"], "must be > 0"),
        (["method.pissa=true", "method.rslora=true"], "PiSSA fixes the LoRA scale at 1"),
        (["method=reft", "data.packing=greedy"], "method=reft with data.packing=greedy"),
        (["method=reft", "train.recompute=true"], "method=reft with train.recompute=true"),
        (["method=reft", "method.reft_layers=[5]"], r"in 0\.\.4"),
        (["method=reft", "method.reft_rank=65"], "reft_rank=65"),
        (["method=reft", "method.reft_act_fn=gelu"], "reft_act_fn='gelu'"),
        (["method=vera", "method.vera_d_init=0"], "neither vector would ever get a gradient"),
        (["method=prefix", "method.num_prefix_tokens=0"], "num_prefix_tokens=0"),
        (["method=lokr", "method.factor=0"], "method.factor=0"),
        *(
            (
                [f"method={m}", "method.target_modules=[]", "model.lora_target_modules=[]"],
                f"method={m}: no target modules",
            )
            for m in ("lora", "qlora", "lokr", "vera")
        ),
    ],
)
def test_method_settings_that_cannot_work_fail(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_run(overrides), CPU)


@pytest.mark.fast
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("method", ["vera", "lokr", "reft"])
def test_methods_without_model_parallel_refuse_it(method: str, layout: str) -> None:
    from helpers import GPU8

    with pytest.raises(ConfigError, match=f"method={method} with parallel={layout}"):
        validate(compose_run([f"method={method}", f"parallel={layout}"]), GPU8)


@pytest.mark.fast
def test_derived_values() -> None:
    assert validate(compose_run(["method.pissa=true"]), CPU)["lora_scaling"] == 1.0
    assert validate(compose_run(["method.use_mora=true"]), CPU)["lora_scaling"] == 1.0
    derived = validate(compose_run(["method=reft", "method.reft_positions=f3+l5"]), CPU)
    assert (derived["reft_first_positions"], derived["reft_last_positions"]) == (3, 5)
    assert validate(compose_run(["method=lokr", "method.lokr_alpha=16"]), CPU)["lokr_scale"] == 2.0


@pytest.mark.parametrize(("n_in", "n_out"), [(64, 64), (64, 32), (64, 172), (172, 64)])
def test_mora_delta_is_the_layers_own_map(n_in: int, n_out: int) -> None:
    """MoRA's merge matrix reproduces its forward (PaddleNLP's get_delta_weight does not)."""
    import paddle
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    from ftlab.methods.lora import lora_delta

    paddle.seed(0)
    layer = LoRALinear(n_in, n_out, r=8, use_mora=True)
    layer.eval()
    layer.lora_A.set_value(paddle.randn(layer.lora_A.shape) * 0.1)
    x = paddle.randn([3, n_in])
    update = (layer(x) - x @ layer.weight).numpy()
    np.testing.assert_allclose((x @ lora_delta(layer)).numpy(), update, atol=1e-5)
    assert np.abs((x @ layer.get_delta_weight()).numpy() - update).max() > 0.1


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "mergeable"),
    [("vera", True), ("lokr", True), ("pissa", True), ("prefix", False), ("reft", False)],
)
def test_ftlab_command_then_ftlab_merge(
    method: str, mergeable: bool, tmp_path: Path, examples: list[dict], tokenizer: Any
) -> None:
    """The real commands: ``ftlab`` trains and saves, ``ftlab-merge RUN_DIR`` merges/refuses."""
    import os
    import subprocess
    import sys

    from paddlenlp.transformers import AutoModelForCausalLM

    from ftlab.methods.reopen import load_trained
    from ftlab.models.loading import finish_model

    bin_dir = Path(sys.executable).parent
    env = without_paddle_vars(os.environ)
    choice = "method.pissa=true" if method == "pissa" else f"method={method}"
    train = subprocess.run(
        [
            str(bin_dir / "ftlab"),
            choice,
            "train.max_steps=4",
            "train.logging_steps=2",
            "eval.demo_metric=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["parameters"]["trainable"] == METHODS[method][1]

    merge = subprocess.run(
        [str(bin_dir / "ftlab-merge"), str(tmp_path / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if not mergeable:
        assert merge.returncode == 2
        assert "cannot be merged into its base" in merge.stderr
        return
    assert merge.returncode == 0, merge.stderr[-3000:]
    batch = collate(tokenizer, examples)
    model, _ = load_trained(tmp_path / "run")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "merged"))
    finish_model(merged)  # the layers load_trained's model computes with
    assert np.abs(logits_of(merged, batch) - logits_of(model, batch)).max() <= MERGE_TOL
