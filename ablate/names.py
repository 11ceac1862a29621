"""Names that become folders and file names in the store: experiments, arms, run ids.

    from ablate.names import check_experiment
    check_experiment("muon-lr")        # returns the name; SpecError (exit 2) for "../x", "A B", ...

Every command that takes an experiment name goes through `check_experiment` (the store checks
it again on every path it builds), so no name can reach outside the store's root.
"""
from __future__ import annotations

import re

from ablate.errors import SpecError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,99}")  # experiment: the store folder
ARM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")  # arm: part of run ids and file names
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")
NAME_RULE = "[a-z0-9][a-z0-9_.-]*, at most 100 characters"
ARM_RULE = "[A-Za-z0-9][A-Za-z0-9_.+-]*, at most 100 characters"


def is_experiment(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def is_arm(name: object) -> bool:
    return isinstance(name, str) and ARM_RE.fullmatch(name) is not None


def check_experiment(name: object, what: str = "experiment") -> str:
    """`name` if it is a valid experiment name, else SpecError naming it and the rule."""
    if not is_experiment(name):
        raise SpecError(f"{what}={name!r} is not a valid experiment name: it must match {NAME_RULE} (it names "
                        "a folder of the store); fix: use the spec's `name:`, e.g. muon-lr")
    return name  # type: ignore[return-value]


def check_arm(name: object, what: str = "arm") -> str:
    if not is_arm(name):
        raise SpecError(f"{what}={name!r} is not a valid arm name: it must match {ARM_RULE}; fix: e.g. baseline")
    return name  # type: ignore[return-value]


def check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or RUN_ID_RE.fullmatch(run_id) is None:
        raise SpecError(f"run id {run_id!r} is not valid: run ids look like <arm>-s<seed>-<config_hash>-a<attempt>; "
                        "fix: copy it from `ablate status` or the runs table")
    return run_id


def check_relpath(relpath: str) -> str:
    """A file path inside an experiment folder: relative, no '..' or '.' parts, no empty parts."""
    parts = relpath.split("/")
    if not relpath or relpath.startswith("/") or "\\" in relpath or \
            any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in relpath):
        raise SpecError(f"path {relpath!r} is not a plain relative path inside the experiment folder")
    return relpath
