"""Where a model name is on this machine: a local directory, or a hub name's snapshot in the
local Hugging Face cache.

``model.name_or_path=Org/Name`` (or ``Org/Name@REVISION``: a branch, tag or commit) whose
snapshot ``huggingface-cli download`` put in the Hugging Face cache is read from there
exactly like a local directory: composition, validation and the plan read its
``config.json``, training converts its weights (``ftlab.interop.hf_in``). No network.

The lookup is ``huggingface_hub.try_to_load_from_cache`` (the cache layout
``models--Org--Name/refs/<revision>`` -> ``snapshots/<commit>/``) with the cache directory
computed at each call: ``huggingface_hub.constants`` reads the environment once, at import,
so a ``HF_HUB_CACHE`` set later (a test, a wrapper script) would be missed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Snapshot:
    """A hub name resolved in the local Hugging Face cache."""

    repo: str  # Org/Name
    revision: str  # what was asked for: "main", a branch, tag or commit
    commit: str  # the snapshot directory's name (the commit hash)
    path: Path

    def record(self) -> dict[str, str]:
        """For the run's provenance."""
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "snapshot": str(self.path),
        }


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, by huggingface_hub's own rule: ``HF_HUB_CACHE``, else
    ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub`` (``HF_HOME`` defaults to
    ``$XDG_CACHE_HOME/huggingface``, then ``~/.cache/huggingface``)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def split_revision(name: str) -> tuple[str, str | None]:
    """``Org/Name@rev`` -> (``Org/Name``, ``rev``); no ``@`` -> (name, None)."""
    repo, sep, revision = name.partition("@")
    return (repo, revision or None) if sep else (name, None)


def is_hub_name(name: str) -> bool:
    """``Org/Name`` (optionally ``@rev``): two non-empty parts, not a path."""
    repo, _ = split_revision(name)
    parts = repo.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith(("/", ".", "~"))


def find_snapshot(name: str) -> Snapshot | None:
    """``name``'s snapshot (with a ``config.json``) in the local Hugging Face cache, if any."""
    if not is_hub_name(name):
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    repo, revision = split_revision(name)
    try:
        found = try_to_load_from_cache(
            repo, CONFIG_FILE, cache_dir=str(hub_cache_dir()), revision=revision
        )
    except HFValidationError:  # not a valid repo id or revision: not a hub name here
        return None
    if not isinstance(found, str):
        return None
    path = Path(found).parent
    return Snapshot(repo=repo, revision=revision or "main", commit=path.name, path=path)


def repo_cache_dir(name: str) -> Path:
    """Where ``name``'s snapshots would be (for messages naming where ftlab looked)."""
    repo, _ = split_revision(name)
    return hub_cache_dir() / f"models--{repo.replace('/', '--')}"


def local_model_dir(name_or_path: str) -> Path | None:
    """The directory on this machine ``name_or_path`` names: itself if it is a directory,
    else a hub name's cached snapshot, else None (a hub name PaddleNLP would download)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    snapshot = find_snapshot(name_or_path)
    return snapshot.path if snapshot else None
