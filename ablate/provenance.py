"""Provenance of the driver side: project root, git commit, package versions, host.

    python -c "from ablate.provenance import driver_info; print(driver_info())"

The trainer reports its own environment in the `start` event; these values fill the gaps
(a run that died before `start`) and describe the machine that ran `ablate run`.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import platform
import socket
from pathlib import Path

from ablate import __version__
from trainer.env import git_commit as _git_commit


def project_root() -> Path:
    """The directory holding the `trainer` package (torchrun's cwd, default data root)."""
    spec = importlib.util.find_spec("trainer")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    return Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=8)
def git_commit(root: str | None = None) -> str | None:
    """HEAD commit of the checkout at `root` (default: project root), '+dirty' if modified
    (trainer.env.git_commit, cached: the driver asks once per run)."""
    return _git_commit(root or str(project_root()))


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it (torch import costs seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_info() -> dict[str, str | None]:
    """What describes the driver: versions, host, commit."""
    return {
        "ablate": __version__,
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "ray": package_version("ray"),
        "pyarrow": package_version("pyarrow"),
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
    }
