"""Optimizers, recompute detail, trackers and generation settings: every option composes
and validates, every invalid combination fails with its message, the mapping reaches
PaddleNLP (TrainingArguments, the model's layers, run_finetune.json), and every optimizer
trains the shipped model."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import CPU, GPU8, compose_run

from ftlab.config.trainer_options import OPTIMIZERS, RECOMPUTE_GRANULARITIES
from ftlab.errors import ConfigError
from ftlab.resolve.validate import check_trackers, validate


def fails(overrides: list[str], match: str, env: Any = CPU) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(compose_run(overrides), env)


# --------------------------------------------------------------------------- validation


@pytest.mark.fast
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_every_optimizer_composes_and_validates(optim: str) -> None:
    run = compose_run([f"train.optim={optim}", "method=full"])
    assert run.train.optim == optim
    validate(run, CPU)


@pytest.mark.fast
@pytest.mark.parametrize("granularity", RECOMPUTE_GRANULARITIES)
def test_every_granularity_validates(granularity: str) -> None:
    validate(
        compose_run(["train.recompute=true", f"train.recompute_granularity={granularity}"]), CPU
    )


@pytest.mark.fast
def test_valid_recompute_details_and_trackers() -> None:
    validate(
        compose_run(
            [
                "train.recompute=true",
                "train.no_recompute_layers=[0,4]",
                "model.flash_attention=true",
                "train.refined_recompute='flash_attn:-1'",
                "train.report_to=[]",
            ]
        ),
        CPU,
    )
    validate(
        compose_run(
            [
                "model=llama3",
                "parallel=tp2",
                "train.recompute=true",
                "train.refined_recompute='mlp_row_ln:2,attention_column_ln:-1'",
                "train.offload_optim=true",
                "device=gpu",
            ]
        ),
        GPU8,
    )


@pytest.mark.fast
@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.optim=adafactor"], "accept the name but its Trainer has no implementation"),
        (["train.optim=sgd"], r"train.optim='sgd' is not one of adamw"),
        (["train.offload_optim=true"], "on CPU they are in host memory already"),
        (
            ["train.recompute_granularity=core_attn"],
            r"train.recompute_granularity=core_attn with train.recompute=false",
        ),
        (["train.no_recompute_layers=[1]"], r"train.no_recompute_layers=\[1\].*recompute=false"),
        (
            ["train.recompute=true", "train.no_recompute_layers=[5]"],
            r"distinct and in 0..4 \(model stories260k has 5 layers\)",
        ),
        (
            ["train.recompute=true", "train.no_recompute_layers=[1,1]"],
            "must be distinct",
        ),
        (["train.recompute=true", "train.refined_recompute=flash_attn"], "is not op:skip_num"),
        (["train.recompute=true", "train.refined_recompute='qkv:-1'"], "unknown op 'qkv'"),
        (["train.recompute=true", "train.refined_recompute='mlp_row_ln:x'"], "not an integer"),
        (["train.recompute=true", "train.refined_recompute='flash_attn:-2'"], "must be >= -1"),
        (
            ["train.recompute=true", "train.refined_recompute='flash_attn:0'"],
            "every skip_num is 0",
        ),
        (
            ["train.recompute=true", "train.refined_recompute='mlp_row_ln:-1'"],
            "refine PaddleNLP's tensor-parallel linear layers",
        ),
        (
            ["train.recompute=true", "train.refined_recompute='flash_attn:-1'"],
            "model.flash_attention=false",
        ),
        (["train.report_to=[comet]"], r"train.report_to='comet' is not one of visualdl"),
        (["train.report_to=[visualdl,visualdl]"], "listed twice"),
        (["eval.top_k=5"], "only apply to eval.decode_strategy=sampling"),
        (["eval.decode_strategy=sampling", "eval.top_p=0"], "0 < top_p <= 1"),
        (["eval.decode_strategy=beam"], "eval.decode_strategy='beam' is not one of"),
        (["eval.metric_tokens=bpe"], "eval.metric_tokens='bpe' is not one of"),
    ],
)
def test_invalid_settings_fail_with_their_message(overrides: list[str], match: str) -> None:
    fails(overrides, match)


@pytest.mark.fast
def test_layout_and_device_refusals_name_both() -> None:
    fails(
        ["model=llama3", "parallel=tp2", "train.optim=adamw_mini", "device=gpu"],
        r"train.optim=adamw_mini with parallel=tp2 \(tensor 2\)",
        GPU8,
    )
    fails(
        ["model=llama3", "parallel=pp2", "eval.generation=true", "device=gpu"],
        r"eval.generation=true with parallel=pp2 \(pipeline 2\)",
        GPU8,
    )
    # Left at null, the data option's generation metric is off where the layout cannot
    # generate, and the resolved config says so.
    pp = validate(compose_run(["model=llama3", "parallel=pp2", "device=gpu"]), GPU8)
    assert pp["eval_generation"] is False
    assert validate(compose_run([]), CPU)["eval_generation"] is True  # demo task: on
    off = validate(compose_run(["eval.generation=false"]), CPU)
    assert off["eval_generation"] is False


@pytest.mark.fast
def test_missing_tracker_package_names_the_install_command() -> None:
    run = compose_run(["train.report_to=[visualdl,tensorboard,wandb]"])
    with pytest.raises(ConfigError) as info:
        check_trackers(run, available=lambda name: name == "visualdl")
    msg = str(info.value)
    assert "tensorboard needs the tensorboardX package (pip install tensorboardX)" in msg
    assert "wandb needs the wandb package (pip install wandb)" in msg
    check_trackers(run, available=lambda name: True)


# --------------------------------------------------------------------------- mapping


def test_training_arguments_and_model_config(tmp_path: Path) -> None:
    from ftlab.training.arguments import recompute_model_config, training_arguments

    run = compose_run(
        [
            "train.optim=adamw_custom",
            "train.recompute=true",
            "train.recompute_granularity=full_attn",
            "train.no_recompute_layers=[0,3]",
            "model.flash_attention=true",
            "train.refined_recompute='flash_attn:2'",
            "train.report_to=[]",
        ]
    )
    validate(run, CPU)
    args = training_arguments(run, tmp_path, 3, has_eval=False)
    assert args.optim.value == "adamw_custom" and args.offload_optim is False
    assert (args.recompute, args.recompute_granularity) == (True, "full_attn")
    assert args.no_recompute_layers == [0, 3] and args.report_to == []
    # PaddleNLP's own parsing of the string, which drops what it cannot use.
    assert args.refined_recompute["flash_attn"] == 2
    config = recompute_model_config(run)
    assert config == {
        "recompute": True,
        "recompute_granularity": "full_attn",
        "no_recompute_layers": [0, 3],
        "refined_recompute": {"flash_attn": 2},
    }
    assert recompute_model_config(compose_run([])) == {}


def test_model_layers_take_the_recompute_details() -> None:
    """The overrides reach the layers PaddleNLP builds (they read them in __init__)."""
    from ftlab.models.loading import load_model
    from ftlab.training.arguments import recompute_model_config

    run = compose_run(
        [
            "train.recompute=true",
            "train.recompute_granularity=core_attn",
            "train.no_recompute_layers=[1]",
        ]
    )
    model = load_model(run.model, "float32", recompute_model_config(run))
    layers = model.llama.layers
    assert model.llama.recompute_granularity == "core_attn"
    assert [layer.self_attn.layerwise_recompute for layer in layers] == [
        True,
        False,
        True,
        True,
        True,
    ]


def test_export_keys_parse_with_paddlenlp(tmp_path: Path) -> None:
    from helpers import parse_like_run_finetune

    from ftlab.interop.paddlenlp_export import export_run_finetune

    run = compose_run(
        [
            "train.optim=adamw_mini",
            "train.recompute=true",
            "train.recompute_granularity=core_attn",
            "train.no_recompute_layers=[2]",
            "train.report_to=[visualdl,tensorboard]",
        ]
    )
    out = export_run_finetune(run, validate(run, CPU), tmp_path)
    args = out["arguments"]
    assert args["optim"] == "adamw_mini" and args["recompute_granularity"] == "core_attn"
    assert args["eval_with_do_generation"] is True and args["save_generation_output"] is True
    model_args, data_args, train_args, remaining = parse_like_run_finetune(
        tmp_path / "run_finetune.json"
    )
    assert remaining == []
    assert data_args.eval_with_do_generation is True
    assert str(train_args.optim.value) == "adamw_mini"
    assert train_args.recompute_granularity == "core_attn"
    assert train_args.no_recompute_layers == [2]
    assert train_args.report_to == ["visualdl", "tensorboard"]
    notes = " ".join(out["notes"])
    assert "eval_with_do_generation" in notes and "AdamWMini applies the previous" in notes


# --------------------------------------------------------------------------- optimizers


def test_ftlab_adamw_mini_steps_with_the_current_moment() -> None:
    """PaddleNLP's AdamWMini leaves the weights unchanged on step 1; ftlab's takes the
    Adam-mini step (one second moment per tensor) computed by hand."""
    import numpy as np
    import paddle
    from paddlenlp.utils import AdamWMini as Theirs

    from ftlab.training.optimizers import AdamWMini

    g = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)

    def one_step(cls: Any) -> np.ndarray:
        w = paddle.create_parameter(
            [4], "float32", default_initializer=paddle.nn.initializer.Constant(1.0)
        )
        opt = cls(learning_rate=0.1, parameters=[w], weight_decay=0.0)
        (w * paddle.to_tensor(g)).sum().backward()
        opt.step()
        return w.numpy()

    assert np.array_equal(one_step(Theirs), np.ones(4, np.float32))  # the defect
    m, v = 0.1 * g, 0.001 * float((g**2).mean())
    expected = 1 - (m / (math.sqrt(v) / math.sqrt(0.001) + 1e-8)) * (0.1 / 0.1)
    assert one_step(AdamWMini) == pytest.approx(expected, abs=1e-6)


def test_every_optimizer_trains_the_shipped_model(tmp_path: Path) -> None:
    """Each optimizer, a few steps of full fine-tuning in FtlabTrainer (one process):
    the loss is finite and falls. The real ``ftlab`` per optimizer is a slow test."""
    import paddle
    from paddlenlp.trainer import TrainerCallback
    from paddlenlp.utils import AdamWMini as Theirs

    from ftlab.data.build import build_data
    from ftlab.data.collate import count_tokens
    from ftlab.models.loading import load_model, load_tokenizer
    from ftlab.training.arguments import training_arguments
    from ftlab.training.optimizers import AdamWMini
    from ftlab.training.trainer import FtlabTrainer

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.values.append(float(logs["loss"]))

    base = compose_run(
        [
            "method=full",
            "train.max_steps=4",
            "train.learning_rate=3e-3",
            "train.per_device_train_batch_size=8",
        ]
    )
    tok = load_tokenizer(base.model)
    data = build_data(base.data, tok, seed=0, need_dev=False)
    for optim in OPTIMIZERS:
        run = dataclasses.replace(base, train=dataclasses.replace(base.train, optim=optim))
        paddle.seed(0)
        collect = Losses()
        args = training_arguments(run, tmp_path / optim, 4, has_eval=False)
        args.report_to, args.logging_steps, args.save_strategy = [], 1, "no"
        args.disable_tqdm = True
        trainer = FtlabTrainer(
            model=load_model(run.model, "float32"),
            args=args,
            train_dataset=data.train_dataset,
            tokenizer=tok,
            data_collator=data.collate_fn,
            count_tokens=count_tokens,
            shuffle=False,
            callbacks=[collect],
        )
        trainer.train()
        losses = collect.values
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), (optim, losses)
        assert losses[-1] < losses[0] - 0.05, (optim, losses)
        if optim == "adamw_mini":
            assert type(trainer.optimizer) is AdamWMini and isinstance(trainer.optimizer, Theirs)
