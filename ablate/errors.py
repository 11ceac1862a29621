"""Errors of the ablate package: one base class, one subclass per kind of failure.

The CLI maps them to exit codes (`ablate.cli`): SpecError → 2 (bad input), Interrupted → 130,
every other AblateError → 1 (runtime failure). Messages name the field, the value and the fix.
"""
from __future__ import annotations


class AblateError(Exception):
    """Base of every error ablate raises on purpose."""

    exit_code = 1


class SpecError(AblateError):
    """The experiment spec (or another user input) is invalid; nothing was run.

    `problems` holds one line per problem, each naming the field, the value and the fix.
    """

    exit_code = 2

    def __init__(self, problems: str | list[str], source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = head + self.problems[0]
        else:
            text = head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class StoreError(AblateError):
    """The Parquet store cannot be read or written (bad URI, unreadable file, newer schema)."""


class LaunchError(AblateError):
    """A trainer process could not be started."""


class Interrupted(AblateError):
    """The driver was stopped (SIGINT/SIGTERM); finished runs are in the store, in-flight ones
    were killed and recorded as `cancelled`. Running the spec again resumes."""

    exit_code = 130


class RunsFailed(AblateError):
    """Some (arm, seed) pairs have no `ok` run after all retries; results were still written."""
