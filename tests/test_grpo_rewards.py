"""GRPO reward functions: the built-ins, ``module:function`` and every bad-reward case."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ftlab.errors import ConfigError
from ftlab.stages.rewards import (
    RewardContext,
    RewardError,
    RewardSet,
    check_reward_settings,
    load_reward,
)

CTX = RewardContext(data_format="src_tgt", length_limit=4)
REC = {"src": "A story about a dog named Max.", "tgt": "Max ran.", "entities": ["Max", "dog"]}
WHERE = ["train.json:7", "train.json:7"]


def score(names, completions, weights=None, records=None, step=3):
    records = records or [REC] * len(completions)
    rs = RewardSet(names, check_reward_settings(names, weights), CTX)
    return rs.score(["p"] * len(completions), completions, records, WHERE, step)


def test_builtins_score_as_documented() -> None:
    s = score(
        ["entity_recall", "exact_match", "regex_match", "length"],
        ["The dog Max ran.", "  Max ran. "],
    )
    np.testing.assert_allclose(s.per_function["entity_recall"], [1.0, 0.5])
    np.testing.assert_allclose(s.per_function["exact_match"], [0.0, 1.0])
    np.testing.assert_allclose(s.per_function["regex_match"], [0.0, 1.0])  # "." matches "."
    np.testing.assert_allclose(s.per_function["length"], [0.0, 0.0])
    long = score(["length"], ["one two three four five six", "a"])
    np.testing.assert_allclose(long.total, [-0.5, 0.0])  # 2 words over a limit of 4


def test_weights_combine_the_functions() -> None:
    s = score(["entity_recall", "exact_match"], ["The dog Max ran.", "Max ran."], [2.0, -1.0])
    np.testing.assert_allclose(s.total, [2.0, 2 * 0.5 - 1.0])


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_user_function_from_the_working_directory(tmp_path, monkeypatch) -> None:
    write_module(
        tmp_path,
        monkeypatch,
        "myrewards_ok",
        "def shout(prompts, completions, records):\n"
        "    return [float(c.count('!')) + len(records[i]['entities']) for i, c in "
        "enumerate(completions)]\n",
    )
    s = score(["myrewards_ok:shout"], ["hi!!", "no"])
    np.testing.assert_allclose(s.total, [4.0, 2.0])


NAN = r"returned nan for completion 1 of record train.json:7"
RAISED = r"'m_raise:f' at step 3 raised KeyError: 'score' \(on the batch of records train.json:7\)"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("def f(p, c, r):\n    return [1.0]\n", r"'m_count:f' at step 3 returned 1 values for 2"),
        ("def f(p, c, r):\n    return [1.0, float('nan')]\n", NAN),
        ("def f(p, c, r):\n    raise KeyError('score')\n", RAISED),
        ("def f(p, c, r):\n    return ['a', 'b']\n", r"not numbers"),
    ],
    ids=["wrong_count", "non_finite", "raises", "not_numbers"],
)
def test_bad_rewards_name_the_function_the_step_and_the_record(
    tmp_path, monkeypatch, body: str, match: str
) -> None:
    name = {"1.0]": "m_count", "nan": "m_nan", "rais": "m_raise"}
    mod = next((v for k, v in name.items() if k in body), "m_text")
    write_module(tmp_path, monkeypatch, mod, body)
    with pytest.raises(RewardError, match=match):
        score([f"{mod}:f"], ["a", "b"])


def test_entity_recall_on_a_record_without_entities_names_it() -> None:
    with pytest.raises(RewardError, match="'entity_recall' at step 3 raised .*entities"):
        score(["entity_recall"], ["a", "b"], records=[{"src": "x", "tgt": "y"}] * 2)


def test_unknown_and_unimportable_rewards_are_config_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'entity_recall'"):
        load_reward("entity_recal", CTX)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="module 'no_such_mod' cannot be imported"):
        load_reward("no_such_mod:f", CTX)
    write_module(tmp_path, monkeypatch, "m_sig", "def f(p):\n    return []\n\ndef g(): pass\n")
    with pytest.raises(ConfigError, match="cannot be called as fn"):
        load_reward("m_sig:f", CTX)
    with pytest.raises(ConfigError, match="has no function 'h'"):
        load_reward("m_sig:h", CTX)
    with pytest.raises(ConfigError, match="needs a finished stage=rm run directory"):
        load_reward("rm:/some/run", CTX)


def test_reward_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="stage.rewards is empty"):
        check_reward_settings([], None)
    with pytest.raises(ConfigError, match="2 values for 1 rewards"):
        check_reward_settings(["length"], [1.0, 2.0])
    with pytest.raises(ConfigError, match="twice"):
        check_reward_settings(["length", "length"], None)
    assert check_reward_settings(["length", "exact_match"], None) == [1.0, 1.0]
