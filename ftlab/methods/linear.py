"""Methods that adapt chosen linear layers (LoRA and its variants, QLoRA, VeRA, LoKr).

They share how targets are chosen (``method.target_modules``, else the model's
``model.lora_target_modules``: regexes matched in full against sublayer names, as
PaddleNLP matches them), the check that some are chosen, and the plan's count: the sum
over the targeted linears of what the method adds to one linear.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ftlab.errors import ConfigError
from ftlab.methods.registry import AdapterPlan, Method
from ftlab.models.arch import Linear, model_linears

if TYPE_CHECKING:
    from ftlab.config.environment import Environment
    from ftlab.config.schema import MethodConfig, ModelConfig, RunConfig


def target_patterns(cfg: MethodConfig, model_cfg: ModelConfig) -> list[str]:
    """The regexes naming the adapted linears: the method's own, else the model's (its
    family's default unless the model option sets them; resolved in composition)."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    return list(model_cfg.lora_target_modules or [])


class LinearAdapterMethod(Method):
    """A method whose adapter sits on the linear layers that ``target_modules`` name."""

    # How the printed plan names the adapter and its ``size_setting`` ("LoRA rank").
    plan_label: str = "adapter size"

    def check(self, run: RunConfig, env: Environment) -> None:
        if not target_patterns(run.method, run.model):
            raise ConfigError(
                f"method={run.method.name}: no target modules. Set method.target_modules or "
                f"model.lora_target_modules (regexes such as '.*q_proj')."
            )
        self.check_size(run)

    def size_limit(self, cfg: MethodConfig, linear: Linear) -> tuple[int, str] | None:
        """The largest value of ``size_setting`` that means something on ``linear``, and
        what that bound is (None: no bound)."""
        return None

    def check_size(self, run: RunConfig) -> None:
        """Refuse a size (rank) beyond what the smallest target layer can use, naming both."""
        if self.size_setting is None:
            return
        value = getattr(run.method, self.size_setting)
        bounds = [(self.size_limit(run.method, x), x) for x in self.targeted_linears(run)]
        bounds = [(b, x) for b, x in bounds if b is not None]
        if not bounds:
            return
        (limit, what), linear = min(bounds, key=lambda item: item[0][0])
        if value > limit:
            raise ConfigError(
                f"method.{self.size_setting}={value} exceeds {what} of the target layer "
                f"{linear.name} ({linear.fan_in} in x {linear.fan_out} out), which is "
                f"{limit}: the extra size adds parameters and no expressiveness. Use "
                f"method.{self.size_setting} <= {limit}, or leave that layer out of "
                "method.target_modules."
            )

    def adapter_size(self, cfg: MethodConfig, linear: Linear) -> int:
        """Trainable parameters the method adds to one ``linear``."""
        raise NotImplementedError

    def frozen_size(self, cfg: MethodConfig, linear: Linear) -> int:
        """Frozen parameters the method adds to one ``linear`` (none for most methods)."""
        return 0

    def targeted_linears(self, run: RunConfig) -> list[Linear]:
        linears = model_linears(run.model)
        patterns = target_patterns(run.method, run.model)
        compiled = [re.compile(p) for p in patterns]
        targeted = [x for x in linears if any(p.fullmatch(x.name) for p in compiled)]
        if not targeted:
            raise ConfigError(
                f"method.target_modules / model.lora_target_modules {patterns} match no "
                f"linear layer of model {run.model.name} (names look like {linears[0].name})."
            )
        return targeted

    def plan(self, run: RunConfig) -> AdapterPlan:
        cfg, targeted = run.method, self.targeted_linears(run)
        targets = sorted({x.name.rsplit(".", 1)[-1] for x in targeted})
        size = getattr(cfg, self.size_setting) if self.size_setting else None
        return AdapterPlan(
            adapter=sum(self.adapter_size(cfg, x) for x in targeted),
            adapter_per_layer=sum(self.adapter_size(cfg, x) for x in targeted if x.layer == 0),
            frozen=sum(self.frozen_size(cfg, x) for x in targeted),
            frozen_per_layer=sum(self.frozen_size(cfg, x) for x in targeted if x.layer == 0),
            targets=targets,
            details={
                **({self.size_setting: size} if self.size_setting else {}),
                "targets": targets,
            },
            lines=[f"adapter        {self.plan_label} {size} on {', '.join(targets)}"],
            adapter_layers=sum(self.adapter_size(cfg, x) for x in targeted if x.layer is not None),
            frozen_layers=sum(self.frozen_size(cfg, x) for x in targeted if x.layer is not None),
        )
