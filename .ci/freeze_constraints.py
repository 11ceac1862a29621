"""Print constraints.txt: the installed version of every package ablate[test,report,cluster] needs,
transitively, torch and its own dependencies' torch pin left out (pinned on the install line).
Run in the environment CI just passed in:  python .ci/freeze_constraints.py > constraints.txt"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

SKIP = {"torch", "ablate", "optuna-dashboard"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = [(r, frozenset(Requirement(r).extras)) for r in md.requires("ablate") or []]
    todo = [(Requirement(r).name, frozenset(Requirement(r).extras | {"test", "report", "cluster"}
                                             if Requirement(r).name == "ablate" else Requirement(r).extras))
            for r, _ in todo if not Requirement(r).marker or any(
                Requirement(r).marker.evaluate({"extra": e}) for e in ("", "test", "report", "cluster"))]
    while todo:
        name, extras = todo.pop()
        key = (canon(name), extras)
        if key in seen or canon(name) in SKIP:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            print(f"# not installed: {name}", file=sys.stderr)
            continue
        pins[canon(name)] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""}) | {""}):
                continue
            todo.append((req.name, frozenset(req.extras)))
    v = sys.version_info
    print(f"# Versions CI last passed with (Python {v.major}.{v.minor}): "
          'pip install torch==2.13.0 -c constraints.txt -e ".[test]"')
    print("# pyproject.toml states the ranges the package accepts; this file pins what a fresh clone installs. torch is")
    print("# left out on purpose: pin it on the install line (CPU build on a laptop, the node's CUDA build on a GPU node).")
    print("# Regenerate after a dependency upgrade that CI has passed: python .ci/freeze_constraints.py > constraints.txt")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
