"""Provenance of a run: software versions, GPUs, host and git commit (the `start` event's env).

    from trainer.env import provenance
    python -c "from trainer.env import provenance; import json; print(json.dumps(provenance(), indent=1))"

Every probe is best-effort: a missing tool (git, nvidia-smi, triton) gives null, never an error.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit(root: str | Path | None = None) -> str | None:
    """HEAD of the git checkout at `root` (default: the one holding the trainer), "+dirty" if tracked
    files changed; None without git or outside a checkout. The one implementation: ablate's driver
    (ablate/provenance.py) and script runs use it too. torch-free, so the driver can call it cheaply."""
    where = Path(root) if root is not None else REPO_ROOT
    head = _run(["git", "rev-parse", "HEAD"], where)
    if head and _run(["git", "status", "--porcelain", "--untracked-files=no"], where):
        head += "+dirty"
    return head


def _triton_version() -> str | None:
    try:
        import triton  # noqa: PLC0415
    except Exception:  # not installed (CPU wheels) or broken
        return None
    return getattr(triton, "__version__", None)


def provenance() -> dict[str, Any]:
    import torch  # noqa: PLC0415 (git_commit above is used by ablate's driver, which need not load torch)

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    names, uuids = [], []
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        names.append(props.name)
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            uuids.append(str(uuid))
    driver = None
    if cuda:
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = driver.splitlines()[0].strip() if driver else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "gpu_name": names[0] if names else None,
        "gpu_count": count,
        "gpu_uuids": uuids,
        "driver": driver,
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


__all__ = ["provenance", "git_commit"]
