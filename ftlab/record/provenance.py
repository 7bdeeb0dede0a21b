"""What reproduces a run: the environment record and the data fingerprints.

The environment record deliberately omits the process environment: it routinely holds
tokens and passwords, and the versions + command + commit are what reproduce a run.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "paddlepaddle",
    "paddlepaddle-gpu",
    "paddlenlp",
    "hydra-core",
    "omegaconf",
    "safetensors",
    "visualdl",
    "sentencepiece",
    "numpy",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_state(repo: Path) -> dict[str, Any]:
    """Commit and dirty flag of the ftlab checkout (None outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.SubprocessError, FileNotFoundError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def ftlab_checkout() -> Path:
    return Path(__file__).resolve().parents[2]


def environment_record(device: str, cpu: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": device,
        **({"cpu": cpu} if cpu else {}),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "ftlab_git": git_state(ftlab_checkout()),
    }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
