"""``ftlab --help`` explains ftlab from the conf tree; schemas stay out of the groups; Hydra's
own flags (--cfg, --info, --shell-completion) work; unknown options get the closest one."""

from __future__ import annotations

import sys

import pytest
import yaml
from helpers import CONF_DIR, compose_cfg, group_options
from hydra.core.config_store import ConfigStore

from ftlab.cli.app import explain_composition_error, main
from ftlab.cli.help import check_selected_options, help_text, option_line
from ftlab.errors import ConfigError
from ftlab.resolve.compose import register_configs, schema_entries

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast

GROUPS = ["model", "method", "data", "parallel", "precision", "experiment"]


def run_hydra_flags(monkeypatch, capsys, *argv: str) -> str:
    """The ``ftlab`` Hydra app in this process with ``argv`` (flags that print and return)."""
    monkeypatch.setattr(sys, "argv", ["ftlab", *argv])
    try:
        main()
    except SystemExit as done:  # --help and --hydra-help exit 0 after printing
        assert done.code in (0, None)
    return capsys.readouterr().out


def test_help_lists_every_option_with_its_first_comment_line() -> None:
    text = help_text({"model": "llama3"}).replace("$$", "$")
    for group in GROUPS:
        assert f"\n  {group}: " in text, group
        for option in group_options(group):
            line = option_line(CONF_DIR / group / f"{option}.yaml")
            assert line and not line.startswith("@package"), (group, option)
            assert f" {option}" in text and line in text, (group, option, line)
    assert "* llama3" in text and "* stories260k" not in text
    for mode in ("train", "plan", "export"):
        assert f"\n  {mode} " in text
    for command in ("ftlab-runs", "ftlab-predict", "ftlab-merge", "ftlab-import", "ftlab-sweep"):
        assert command in text
    assert "base_" not in text and "powered by Hydra" not in text


def test_ftlab_help_command(monkeypatch, capsys) -> None:
    out = run_hydra_flags(monkeypatch, capsys, "--help", "method=qlora")
    assert out.startswith("ftlab: fine-tune large language models")
    assert "* qlora" in out and "* lora " not in out
    assert "base_" not in out and "$" not in out.replace("$ ", "")
    hydra_help = run_hydra_flags(monkeypatch, capsys, "--hydra-help")
    assert hydra_help.startswith("ftlab is a Hydra app") and "--shell-completion" in hydra_help


def test_cfg_info_and_shell_completion(monkeypatch, capsys) -> None:
    cfg = yaml.safe_load(run_hydra_flags(monkeypatch, capsys, "--cfg", "job", "method=qlora"))
    assert cfg["method"]["name"] == "qlora" and cfg["method"]["quant_algo"] == "nf4"
    info = run_hydra_flags(monkeypatch, capsys, "--info", "defaults")
    assert "method/lora" in info and "base_lora" in info  # the schema, under the option
    script = run_hydra_flags(monkeypatch, capsys, "--shell-completion", "install=bash")
    assert "complete" in script and "ftlab" in script
    monkeypatch.setenv("COMP_LINE", "ftlab method=")
    out = run_hydra_flags(monkeypatch, capsys, "--shell-completion", "query=bash").split()
    options = {o for o in out if o.startswith("method")}
    # (Other tests may store a method of their own in the process-wide ConfigStore.)
    assert {f"method={o}" for o in group_options("method")} <= options
    assert not any("base_" in o for o in options)
    monkeypatch.setenv("COMP_LINE", "ftlab ")
    top = run_hydra_flags(monkeypatch, capsys, "--shell-completion", "query=bash").split()
    assert "method=" in top and not any("base_" in t for t in top)


def test_schemas_live_outside_the_groups() -> None:
    register_configs()
    repo = ConfigStore.instance().repo
    for group in ("model", "method", "data", "parallel", "precision"):
        assert not any(name.startswith("base_") for name in repo.get(group, {})), group
    for name in schema_entries():
        assert f"{name}.yaml" in repo, name


@pytest.mark.parametrize("group", ["model", "method", "data", "parallel", "precision", "stage"])
def test_every_option_names_its_schema_first(group: str) -> None:
    """The defaults-list line every option YAML needs: ``- /base_<schema>@_here_`` (a
    stage that also overrides other groups is global: ``@stage``), or another option of
    the group that does (``model=qwen2`` extends ``qwen2_5_7b``)."""
    entries = schema_entries()
    options = group_options(group)
    for option in options:
        defaults = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text())["defaults"]
        first = defaults[0]
        if first in options:
            continue  # checked as an option of its own
        package = "@stage" if group == "stage" and first.endswith("@stage") else "@_here_"
        assert first.startswith("/base_") and first.endswith(package), (option, first)
        assert first[1 : -len(package)] in entries, (option, first)


def test_unknown_option_lists_the_options_and_the_closest(capsys) -> None:
    for override, closest in (("method=lorra", "method=lora"), ("model=llama", "model=llama3")):
        with pytest.raises(Exception) as info:
            compose_cfg([override])
        msg = explain_composition_error(info.value)
        group = override.split("=")[0]
        options = ", ".join(group_options(group))
        assert msg.startswith(f"{override}: no such {group} option. Options: {options}.")
        assert f"Closest: {closest}." in msg
    with pytest.raises(Exception) as info:
        compose_cfg(["parallel=zz"])
    msg = explain_composition_error(info.value)
    assert "Options: auto, dp2, dp8" in msg and "Closest" not in msg  # nothing is close to zz
    with pytest.raises(Exception) as info:
        compose_cfg(["data=alpacca"])
    assert "Closest: data=alpaca." in explain_composition_error(info.value)


def test_a_missing_optional_option_is_refused() -> None:
    """Hydra skips ``experiment=typo`` (the group is optional) and would run without it."""
    sources = [type("Source", (), {"schema": "file", "path": str(CONF_DIR)})()]
    check_selected_options({"experiment": "optuna_lr_rank", "method": "lora"}, sources)
    check_selected_options({"experiment": None}, sources)
    with pytest.raises(ConfigError, match=r"experiment=optuna: no such experiment option.*"):
        check_selected_options({"experiment": "optuna"}, sources)


def test_help_page_equals_hydras_own_rendering(monkeypatch, capsys) -> None:
    """ftlab skips Hydra's unused group listings; the page must not change by a byte."""
    from hydra._internal.hydra import Hydra

    lean = run_hydra_flags(monkeypatch, capsys, "--help", "model=llama3")
    monkeypatch.setattr(Hydra, "get_help", Hydra.get_help.__wrapped__)
    assert run_hydra_flags(monkeypatch, capsys, "--help", "model=llama3") == lean
    assert "* llama3" in lean


PADDLE_IMPORTED = """
import sys
sys.argv = ["ftlab", *sys.argv[1:]]
from ftlab.cli.app import main
try:
    main()
except SystemExit as err:
    assert err.code in (0, None), err.code
print("IMPORTED", sorted({m.split(".")[0] for m in sys.modules} & {"paddle", "paddlenlp"}))
"""


def test_help_and_plan_do_not_import_paddle_on_the_cpu_wheel(tmp_path) -> None:
    import subprocess

    from ftlab.config.environment import cpu_build_version, probe_environment

    # What Paddle itself says, asked in a child process (this test runs in make test-fast,
    # whose processes must not import Paddle).
    ask = "import paddle; print(paddle.device.is_compiled_with_cuda(), paddle.__version__)"
    cuda, version = subprocess.run(
        [sys.executable, "-c", ask], capture_output=True, text=True, check=True
    ).stdout.split()[-2:]
    if cuda == "True":
        assert cpu_build_version() is None
        pytest.skip("a CUDA build of Paddle: the probe must import it")
    # The probe without Paddle says what Paddle itself says.
    assert cpu_build_version() == version
    env = probe_environment("auto")
    assert (env.device, env.paddle_version, env.cuda_build) == ("cpu", version, False)
    with pytest.raises(ConfigError, match="device=gpu: no CUDA device"):
        probe_environment("gpu")
    for args in (["--help"], ["mode=plan", f"hydra.run.dir={tmp_path / 'plan'}"]):
        out = subprocess.run(
            [sys.executable, "-c", PADDLE_IMPORTED, *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        ).stdout
        assert "IMPORTED []" in out, (args, out[-500:])
    assert (tmp_path / "plan" / "plan.json").exists()
