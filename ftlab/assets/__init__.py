"""Checkpoints and data sets shipped inside ftlab, addressed by name (``${asset:NAME}``)."""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).parent


def available_assets() -> list[str]:
    """Names of the shipped assets: every entry here that is not Python packaging."""
    return sorted(
        p.name
        for p in _ROOT.iterdir()
        if not p.name.startswith(("_", ".")) and p.suffix not in (".py", ".pyc")
    )


def asset_path(name: str) -> Path:
    """The path of the shipped asset ``name``; configs refer to assets by name, not location."""
    path = _ROOT / name
    if not name or Path(name).name != name or not path.exists():
        raise FileNotFoundError(
            f"no shipped asset named {name!r} in {_ROOT}. Available: "
            f"{', '.join(available_assets()) or '(none)'}. Use one of these names, or point "
            "the setting at a local path instead."
        )
    return path
