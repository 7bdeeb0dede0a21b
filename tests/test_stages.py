"""Preference stages on the shipped stories260K model: the losses equal their formulas
computed from separate forward passes, the reference model is the starting model, and
the stage group composes and validates with every method, layout and loss.

The numeric tests build the batch through ftlab's data path (records -> rows -> collate)
and the Trainer through the stage (``Stage.make_trainer``), as a run does; the expected
values come from plain forward passes of ``[bos] + prompt + response`` one at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import CPU, GPU8, compose_run

from ftlab.errors import ConfigError
from ftlab.resolve.validate import validate

PAIRS = [
    {
        "src": "Write a short story about a dog named Max who finds a red ball.",
        "tgt": [],
        "response": [
            "Max was a happy dog. One day, Max found a red ball.",
            "Max was a happy cat. One day, Max found a blue hat in the big park.",
        ],
        "sort": [1, 0],
    },
    {
        "src": "Tell me a story about Sue the cow.",
        "tgt": [],
        "response": ["Sue the cow ate grass.", "Tim the pig ran."],
        "sort": [0, 1],  # the second response is chosen
    },
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from ftlab.models.loading import load_tokenizer

    return load_tokenizer(compose_run().model)


def preference_batch(tmp_path: Path, tokenizer: Any, kind: str = "pairwise") -> dict:
    from ftlab.config.schema import DataConfig
    from ftlab.data.preference_examples import build_preference_data

    (tmp_path / "train.json").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    cfg = DataConfig(name="t", path=str(tmp_path), max_length=96, src_length=48)
    data = build_preference_data(cfg, tokenizer, kind=kind, seed=0, need_dev=False)
    items = [data.train_dataset[i] for i in range(len(data.train_dataset))]
    return data.collate_fn(items)


def stage_trainer(run: Any, tmp_path: Path, tokenizer: Any, perturb: float = 0.3) -> tuple:
    """The run's model (LoRA factors drawn away from zero so policy and reference differ),
    its reference, and the stage's Trainer, built as ``ftlab.training.run`` builds them."""
    import paddle

    from ftlab.data.collate import count_tokens
    from ftlab.methods.catalog import get_method
    from ftlab.stages.catalog import get_stage
    from ftlab.stages.registry import REFERENCE_COPY
    from ftlab.training.arguments import training_arguments

    paddle.seed(0)
    method, stage = get_method(run.method.name), get_stage(run.stage.name)
    model = method.load_base(run.method, run.model, dtype="float32")
    reference = None
    if stage.reference(run) == REFERENCE_COPY:
        reference = method.load_base(run.method, run.model, dtype="float32")
        reference.eval()
    model = method.apply(model, run.method, run.model)
    with paddle.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.set_value(paddle.randn(p.shape, dtype=p.dtype) * perturb)
    args = training_arguments(run, tmp_path, 1, has_eval=False)
    args.report_to, args.disable_tqdm = [], True
    trainer = stage.make_trainer(
        run,
        reference_model=reference,
        method=method,
        model=model,
        args=args,
        train_dataset=None,
        eval_dataset=None,
        tokenizer=tokenizer,
        data_collator=None,
        count_tokens=count_tokens,
        shuffle=False,
    )
    return model, trainer


def response_logps(model: Any, tokenizer: Any, adapter_on: bool = True) -> np.ndarray:
    """[pairs, 2]: sum of log p(token) over each response (+ eos), chosen first, from one
    plain forward pass of ``[bos] + prompt + response`` per response."""
    import paddle

    from ftlab.methods.lora import set_lora_enabled

    if not adapter_on:
        set_lora_enabled(model, False)
    model.eval()
    out = []
    for p in PAIRS:
        chosen_first = p["response"] if p["sort"][0] > p["sort"][1] else p["response"][::-1]
        row = []
        for text in chosen_first:
            prompt = [
                tokenizer.bos_token_id,
                *tokenizer(p["src"], add_special_tokens=False)["input_ids"],
            ]
            answer = [
                *tokenizer(text, add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id,
            ]
            ids = paddle.to_tensor([prompt + answer[:-1]], dtype="int64")
            with paddle.no_grad():
                logits = model(input_ids=ids)
            logits = (logits[0] if isinstance(logits, (tuple, list)) else logits.logits)[0]
            logp = paddle.nn.functional.log_softmax(logits.astype("float64"), axis=-1).numpy()
            row.append(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(answer)))
        out.append(row)
    if not adapter_on:
        set_lora_enabled(model, True)
    return np.asarray(out, dtype=np.float64)


def trainer_loss(trainer: Any, batch: dict) -> tuple[float, dict]:
    """The loss the Trainer trains on, and what it logged (its metrics inputs)."""
    import paddle

    seen: dict = {}
    original = trainer.log_metric

    def capture(**kwargs: Any) -> None:
        seen.update({k: v for k, v in kwargs.items() if k != "train_eval"})
        original(**kwargs)

    trainer.log_metric = capture
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
    trainer.model.train()
    with paddle.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    return float(loss), {k: np.asarray(v.numpy(), np.float64) for k, v in seen.items()}


# --------------------------------------------------------------------------- DPO loss


LOGPS_TOL = 5e-5


def test_dpo_sigmoid_loss_equals_the_formula(tmp_path: Path, tokenizer: Any) -> None:
    run = compose_run(["stage=dpo", "stage.beta=0.1"])
    model, trainer = stage_trainer(run, tmp_path, tokenizer, perturb=0.05)
    loss, seen = trainer_loss(trainer, preference_batch(tmp_path, tokenizer))
    policy = response_logps(model, tokenizer)
    reference = response_logps(model, tokenizer, adapter_on=False)
    beta = 0.1
    z = beta * ((policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1]))
    expected = float(np.mean(np.log1p(np.exp(-z))))  # -log sigmoid(z)
    # Not saturated (measured: z = 0.50 and 2.08, loss 0.2967): a wrong log-prob shows.
    assert 0.1 < loss < 0.6 and abs(z).min() > 0.1
    assert loss == pytest.approx(expected, abs=1e-6)
    # Sums of ~60 token log-probs from float32 logits, the trainer's in a padded batch,
    # these from one row each: the two paths round differently (measured up to 2.7e-5 with
    # ftlab's CPU layers, which the loaded model computes with).
    assert np.allclose(seen["policy_chosen_logps"], policy[:, 0], atol=LOGPS_TOL, rtol=0)
    assert np.allclose(seen["reference_rejected_logps"], reference[:, 1], atol=LOGPS_TOL, rtol=0)


def test_identical_policy_and_reference_give_log_2(tmp_path: Path, tokenizer: Any) -> None:
    run = compose_run(["stage=dpo"])
    _, trainer = stage_trainer(run, tmp_path, tokenizer, perturb=0.0)  # LoRA B = 0
    loss, _ = trainer_loss(trainer, preference_batch(tmp_path, tokenizer))
    assert loss == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize(
    ("loss_type", "formula"),
    [
        ("hinge", lambda z, beta, pc, pr: np.maximum(0, 1 - beta * z)),
        ("ipo", None),  # length-normalised: checked through PaddleNLP's average_log_prob
        ("simpo", None),
    ],
)
def test_other_dpo_losses_run_through_the_same_path(
    tmp_path: Path, tokenizer: Any, loss_type: str, formula: Any
) -> None:
    run = compose_run(["stage=dpo", f"stage.loss_type={loss_type}", "stage.beta=0.1"])
    model, trainer = stage_trainer(run, tmp_path, tokenizer, perturb=0.05)
    loss, seen = trainer_loss(trainer, preference_batch(tmp_path, tokenizer))
    assert np.isfinite(loss)
    if formula is not None:
        policy = response_logps(model, tokenizer)
        reference = response_logps(model, tokenizer, adapter_on=False)
        z = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
        expected = float(np.mean(formula(z, 0.1, policy[:, 0], policy[:, 1])))
        assert loss > 0.1  # not clipped to 0
        # beta x (four log-prob sums, each within LOGPS_TOL): hinge is linear in z.
        assert loss == pytest.approx(expected, abs=0.1 * 4 * LOGPS_TOL)
    if loss_type == "simpo":  # reference-free: no reference log-probs at all
        assert np.all(seen["reference_chosen_logps"] == 0)


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_reference_logps_equal_the_adapter_free_base(
    tmp_path: Path, tokenizer: Any, method: str
) -> None:
    """The reference is the trained model with its adapter off: no second copy, and its
    log-probs are a freshly loaded base model's (QLoRA: the same quantized base)."""
    from ftlab.stages.catalog import get_stage

    run = compose_run(["stage=dpo", f"method={method}"])
    assert get_stage("dpo").reference(run) == "adapter"
    model, trainer = stage_trainer(run, tmp_path, tokenizer)
    _, seen = trainer_loss(trainer, preference_batch(tmp_path, tokenizer))
    fresh, _ = stage_trainer(run, tmp_path / "fresh", tokenizer, perturb=0.0)  # B = 0: the base
    base = response_logps(fresh, tokenizer)
    assert np.abs(seen["reference_chosen_logps"] - base[:, 0]).max() <= 1e-6 * 50
    assert np.abs(seen["reference_rejected_logps"] - base[:, 1]).max() <= 1e-6 * 50
    # ... exactly the same computation as the policy's with the adapter switched off:
    batch = preference_batch(tmp_path, tokenizer)
    _, again = trainer_loss(trainer, batch)
    assert np.array_equal(again["reference_chosen_logps"], seen["reference_chosen_logps"])
    assert np.abs(seen["policy_chosen_logps"] - base[:, 0]).max() > 1e-2  # adapter is on


def test_reference_logps_equal_the_base_exactly_in_one_layout(
    tmp_path: Path, tokenizer: Any
) -> None:
    """Reference log-probs through the trainer (adapter off) vs the base model without any
    adapter, on the very same collated batch: equal to 1e-6."""
    import paddle

    from ftlab.models.loading import load_model

    run = compose_run(["stage=dpo"])
    _, trainer = stage_trainer(run, tmp_path, tokenizer)
    batch = preference_batch(tmp_path, tokenizer)
    _, seen = trainer_loss(trainer, batch)
    base = load_model(run.model, "float32")
    base.eval()
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
    with paddle.no_grad():
        logits = base(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            attention_mask=inputs["attention_mask"],
        )
    labels = (
        inputs["chosen_labels"],
        inputs["rejected_labels"],
        inputs["response_indexs"],
        None,
        None,
    )
    chosen, rejected = trainer.dpo_criterion(logits, labels)
    assert np.abs(chosen.numpy() - seen["reference_chosen_logps"]).max() <= 1e-6
    assert np.abs(rejected.numpy() - seen["reference_rejected_logps"]).max() <= 1e-6


def test_full_finetuning_keeps_a_frozen_copy_as_reference(tmp_path: Path, tokenizer: Any) -> None:
    import paddle

    from ftlab.stages.catalog import get_stage

    run = compose_run(["stage=dpo", "method=full"])
    assert get_stage("dpo").reference(run) == "copy"
    model, trainer = stage_trainer(run, tmp_path, tokenizer)
    before = response_logps(trainer.ref_model, tokenizer)
    with paddle.no_grad():  # the policy moves; the reference must not
        for p in model.parameters():
            p.set_value(p + 0.01 * paddle.randn(p.shape, dtype=p.dtype))
    _, seen = trainer_loss(trainer, preference_batch(tmp_path, tokenizer))
    assert np.abs(seen["reference_chosen_logps"] - before[:, 0]).max() <= 5e-5
    assert np.abs(seen["policy_chosen_logps"] - before[:, 0]).max() > 1e-2


# --------------------------------------------------------------------------- KTO


def test_kto_loss_equals_the_formula_with_a_clipped_kl(tmp_path: Path, tokenizer: Any) -> None:
    import paddle

    run = compose_run(["stage=kto", "stage.beta=0.3", "stage.undesirable_weight=2"])
    model, trainer = stage_trainer(run, tmp_path, tokenizer)
    batch = preference_batch(tmp_path, tokenizer, kind="labelled")
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
    seen: dict = {}
    original = trainer.log_metric

    def capture(**kwargs: Any) -> None:
        seen.update(kwargs)
        original(**kwargs)

    trainer.log_metric = capture
    with paddle.no_grad():
        loss = float(trainer.compute_loss(model, inputs))
    policy = response_logps(model, tokenizer)  # [pair, (chosen, rejected)]
    reference = response_logps(model, tokenizer, adapter_on=False)
    kl = max(float(seen["kl"]), 0.0)
    assert float(seen["kl"]) >= 0  # clipped at 0 on one process too
    desirable = 1 - 1 / (1 + np.exp(-0.3 * (policy[:, 0] - reference[:, 0] - kl)))
    undesirable = 1 - 1 / (1 + np.exp(-0.3 * (kl - (policy[:, 1] - reference[:, 1]))))
    expected = float(np.mean(np.concatenate([desirable, 2 * undesirable])))
    assert loss == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- settings


@pytest.mark.fast
def test_every_stage_option_composes_and_validates_with_every_method() -> None:
    from helpers import group_options

    assert group_options("stage") == [
        "dpo",
        "grpo",
        "kto",
        "rm",
        "sft",
    ]  # grpo, rm: test_grpo_stage.py
    # (stage=sft with every method: tests/test_config.py composes every method.)
    for stage in ("dpo", "kto"):
        for method in group_options("method"):
            run = compose_run([f"stage={stage}", f"method={method}"])
            if method in ("reft", "prefix"):
                with pytest.raises(ConfigError, match=f"method={method} with stage={stage}: "):
                    validate(run, CPU)
                continue
            derived = validate(run, CPU)
            if stage != "sft":
                expected = "adapter" if method in ("lora", "qlora") else "copy"
                assert derived["reference"] == expected, (stage, method)


@pytest.mark.parametrize(
    "loss_type",
    ["sigmoid", "hinge", "ipo", "kto_pair", "sppo_hard", "nca_pair", "dpop", "or", "orpo", "simpo"],
)
def test_every_installed_dpo_loss_validates(loss_type: str) -> None:
    from paddlenlp.trl import DPOTrainer

    derived = validate(compose_run(["stage=dpo", f"stage.loss_type={loss_type}"]), CPU)
    # every loss ftlab offers is one the installed DPOTrainer accepts
    import inspect

    assert f'"{derived["dpo_loss"]}"' in inspect.getsource(DPOTrainer.__init__)
    assert derived["reference_free"] == (loss_type in ("or", "orpo", "simpo"))
    assert derived["reference"] == ("none" if derived["reference_free"] else "adapter")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage.loss_type=dpo2"], "stage.loss_type='dpo2' is not one of"),
        (["stage.beta=0"], "stage.beta=0.0: must be > 0"),
        (["stage.label_smoothing=0.6"], r"must be in \[0, 0.5\)"),
        (["stage.loss_type=ipo", "stage.label_smoothing=0.1"], "only the sigmoid and simpo"),
        (["stage.simpo_gamma=1"], "only simpo uses it"),
        (["stage.dpop_lambda=5"], "only dpop uses it"),
        (["stage.loss_type=simpo", "stage.reference_free=false"], "this loss has no reference"),
        (["stage.loss_type=dpop", "stage.reference_free=true"], "this loss needs the reference"),
        (["data=demo_stories"], "data.format=src_tgt is SFT data"),
        (["data.format=prompt_completion_label"], "stage=dpo reads src_response"),
        (["data.streaming=true", "train.max_steps=3"], "data.streaming=true with stage=dpo"),
        (["parallel=pp2", "parallel.cpu_emulation=true"], "pipeline 2"),
        (["parallel=tp2", "parallel.cpu_emulation=true"], "checked for SFT only"),
        (["init_from=/no/such/run"], "init_from=/no/such/run: .* does not exist"),
        # What only the SFT data path builds.
        (
            ["model.flash_attention=true", "model.flash_mask=true", "data.packing=zero_padding"],
            "model.flash_mask=true with stage=dpo",
        ),
        (
            ["data.pose=true", "model.rope_scaling.strategy=linear", "model.rope_scaling.factor=4"],
            "data.pose=true with stage=dpo",
        ),
        (
            [
                "data.path=null",
                "data.train_path=null",
                "data.dev_path=null",
                "data.sources=[{path:/x,weight:1}]",
            ],
            r"data.sources \(a mixture\) with stage=dpo",
        ),
        (["eval.generation=true"], "eval.generation=true with stage=dpo"),
    ],
)
def test_settings_a_preference_stage_cannot_honour_fail_in_validation(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_run(["stage=dpo", *overrides]), CPU)


@pytest.mark.fast
def test_preference_data_under_sft_is_refused() -> None:
    with pytest.raises(ConfigError, match="data.format=src_response is preference data"):
        validate(compose_run(["data=demo_preferences"]), CPU)


@pytest.mark.fast
def test_gpu_layouts_validate_for_dpo() -> None:
    for layout in ("dp8", "sharding_stage2", "tp4"):
        derived = validate(compose_run(["stage=dpo", f"parallel={layout}", "precision=bf16"]), GPU8)
        assert derived["reference"] == "adapter"


@pytest.mark.fast
def test_resume_refuses_a_changed_stage_or_starting_point(tmp_path: Path) -> None:
    from ftlab.record.resume import check_resume_config
    from ftlab.resolve.compose import resolved_config_yaml, to_plain_dict

    run = compose_run(["stage=dpo"])
    (tmp_path / "resolved_config.yaml").write_text(resolved_config_yaml(run, {}))
    for changed, key in (
        (["stage=kto"], "stage.name"),
        (["stage=dpo", "init_from=/x"], "init_from"),
    ):
        with pytest.raises(ConfigError, match=f"cannot change on resume.*{key}"):
            check_resume_config(tmp_path, to_plain_dict(compose_run(changed)))
    beta = compose_run(["stage=dpo", "stage.beta=0.2"])
    assert check_resume_config(tmp_path, to_plain_dict(beta)) == ["stage.beta: 0.5 -> 0.2"]
    # A run from before stages existed resumes as the SFT run it was.
    sft = compose_run([])
    body = resolved_config_yaml(sft, {}).replace("stage:\n  name: sft\n", "")
    (tmp_path / "resolved_config.yaml").write_text(body.replace("init_from: null\n", ""))
    assert check_resume_config(tmp_path, to_plain_dict(sft)) == []
