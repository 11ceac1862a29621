"""Errors of the ablate package: one base class, one subclass per kind of failure, and the exit
codes every `ablate` command uses (the one table; `ablate --help` and docs/spec.md show it).

    from ablate.errors import EXIT_CODES, SpecError
    raise SpecError("seeds=0: need at least 1 seed; fix: seeds: 8")   # exit code 2

Messages name the field, the value and the fix.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # runs failed after their retries, or a runtime error (store, Ray)
EXIT_BAD_INPUT = 2  # invalid spec, argument, file, name or store URI; nothing was run or changed
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM (128 + SIGINT, as a shell reports it)

# (code, meaning): the table shown by `ablate --help` and docs/spec.md ("Exit codes").
EXIT_CODES = (
    (EXIT_OK, "ok: every requested run has an ok result, the command did what it was asked"),
    (EXIT_FAILED, "runs failed (after their retries; results and table are written first) or a runtime "
                  "error: a store write or read failed, Ray failed, the experiment lock was lost"),
    (EXIT_BAD_INPUT, "bad input, refused before anything ran or changed: invalid spec, argument, file, "
                     "experiment name or store URI; the experiment is locked by another driver"),
    (EXIT_INTERRUPTED, "interrupted (SIGINT/SIGTERM): finished runs are kept, in-flight ones recorded "
                       "`cancelled`; run the same command again to resume"),
)


def exit_codes_text(indent: str = "") -> str:
    """The exit-code table as plain text lines."""
    return "\n".join(f"{indent}{code:>3}  {text}" for code, text in EXIT_CODES)


class AblateError(Exception):
    """Base of every error ablate raises on purpose."""

    exit_code = EXIT_FAILED


class SpecError(AblateError):
    """The experiment spec (or another user input) is invalid; nothing was run.

    `problems` holds one line per problem, each naming the field, the value and the fix.
    """

    exit_code = EXIT_BAD_INPUT

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


class LockHeld(AblateError):
    """Another driver holds the experiment's lock (ablate.store.lock); nothing was run or changed."""

    exit_code = EXIT_BAD_INPUT


class LockLost(AblateError):
    """This driver's experiment lock was taken over or could not be kept fresh; the driver stopped."""


class LaunchError(AblateError):
    """A trainer process could not be started."""


class Interrupted(AblateError):
    """The driver was stopped (SIGINT/SIGTERM); finished runs are in the store, in-flight ones
    were killed and recorded as `cancelled`. Running the spec again resumes."""

    exit_code = EXIT_INTERRUPTED


class PatchError(AblateError):
    """A diff is malformed or does not apply; the message quotes the hunk."""


class LogFormatError(AblateError):
    """A file is not a speedrun-style log (or cannot be read)."""


class AnalysisError(AblateError):
    """The table or report cannot be made (no runs, bad option)."""


class SearchSpaceError(SpecError):
    """A bad `search:` block (or a study made for another one); one line per problem."""


class PlotsUnavailable(AblateError):
    """matplotlib is not installed (it is the `report` extra)."""
