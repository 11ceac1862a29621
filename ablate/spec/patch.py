"""Unified diffs (as `git diff` writes and `git apply` takes them) applied to text in memory. No git.

    from ablate.spec.patch import parse_patch, apply_file_patch
    patches = parse_patch(Path("my/no_smear.diff").read_text())      # one FilePatch per file in the diff
    new_text = apply_file_patch(script_text, patches[0])             # PatchError names the failing hunk

Rules (git apply's, without fuzz): every hunk's preimage (its context and `-` lines) must match
the text exactly, at its stated line or at any offset from it (the nearest match wins; hunks apply
in order and never overlap); `\\ No newline at end of file` is honoured; a context line that an
editor stripped to nothing counts as an empty context line. Creating, deleting, renaming or
binary-patching files is not supported: script experiments patch existing text files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ablate.errors import PatchError

HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
SHOWN_HUNK_LINES = 14  # lines of a failing hunk quoted in the error


@dataclass
class Hunk:
    header: str  # "@@ -1412,5 +1412,5 @@ ..."
    old_start: int  # 1-based line of the preimage in the original
    lines: list[str] = field(default_factory=list)  # " x\n", "-x\n", "+x\n" (newline as in the diff)
    old_len: int = 0
    new_len: int = 0

    def old(self) -> list[str]:
        return [ln[1:] for ln in self.lines if ln[0] in " -"]

    def new(self) -> list[str]:
        return [ln[1:] for ln in self.lines if ln[0] in " +"]

    def text(self, limit: int = SHOWN_HUNK_LINES) -> str:
        shown = [self.header] + [ln.rstrip("\n") for ln in self.lines[:limit]]
        if len(self.lines) > limit:
            shown.append(f"... ({len(self.lines) - limit} more lines)")
        return "\n".join("    " + ln for ln in shown)


@dataclass
class FilePatch:
    path: str  # the file the diff names (after a/ or b/ is stripped)
    hunks: list[Hunk] = field(default_factory=list)

    def matches(self, name: str) -> bool:
        """Whether this diff is for `name` (a path relative to the script's folder): equal, or the
        diff's path ends in /name (a diff made at the repository root of a fork)."""
        return self.path == name or self.path.endswith("/" + name)


def _strip_prefix(path: str) -> str:
    path = path.split("\t", 1)[0].strip()
    if path.startswith('"') and path.endswith('"'):
        path = path[1:-1]
    return path[2:] if path.startswith(("a/", "b/")) else path


def parse_patch(text: str, source: str = "patch") -> list[FilePatch]:
    """Every file's hunks in a unified diff; PatchError on anything it cannot apply."""
    lines = text.splitlines(keepends=True)
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("GIT binary patch") or line.startswith("Binary files "):
            raise PatchError(f"{source}: binary patches are not supported (line {i + 1})")
        if line.startswith(("rename from ", "copy from ")):
            raise PatchError(f"{source}: line {i + 1}: renaming or copying files is not supported; fix: diff the "
                             "file under one name (git diff -M is not needed)")
        if not (line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")):
            i += 1
            continue
        old, new = _strip_prefix(line[4:]), _strip_prefix(lines[i + 1][4:])
        if old == "/dev/null":
            raise PatchError(f"{source}: line {i + 1}: the diff creates {new!r}; a patch may only change the "
                             "script and its `files:`; fix: add the new file to `files:` instead")
        if new == "/dev/null":
            raise PatchError(f"{source}: line {i + 1}: the diff deletes {old!r}, which is not supported")
        fp = FilePatch(path=new)
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            hunk, i = _parse_hunk(lines, i, source)
            fp.hunks.append(hunk)
        if not fp.hunks:
            raise PatchError(f"{source}: line {i + 1}: no hunk (`@@ -l,s +l,s @@`) after the header of {new!r}")
        files.append(fp)
    if not files:
        raise PatchError(f"{source}: not a unified diff (no `--- a/FILE` / `+++ b/FILE` / `@@` lines); fix: make "
                         "it with `git diff -- train_gpt.py > my.diff` or `diff -u old.py new.py`")
    return files


def _parse_hunk(lines: list[str], i: int, source: str) -> tuple[Hunk, int]:
    m = HUNK_HEADER.match(lines[i])
    if not m:
        raise PatchError(f"{source}: line {i + 1}: malformed hunk header {lines[i].rstrip()!r}")
    old_len = 1 if m[2] is None else int(m[2])
    new_len = 1 if m[4] is None else int(m[4])
    hunk = Hunk(header=lines[i].rstrip("\n"), old_start=int(m[1]), old_len=old_len, new_len=new_len)
    start, i = i, i + 1
    seen_old = seen_new = 0
    while seen_old < old_len or seen_new < new_len:
        if i >= len(lines):
            raise PatchError(f"{source}: line {start + 1}: hunk {hunk.header!r} ends early (the file is truncated "
                             f"or the header's line counts are wrong)")
        ln = lines[i]
        if ln in ("\n", "\r\n"):  # an editor stripped the context line's leading space
            ln = " " + ln
        tag = ln[0]
        if tag == "\\":  # "\ No newline at end of file": the previous line has none
            _drop_newline(hunk)
            i += 1
            continue
        if tag not in " -+":
            raise PatchError(f"{source}: line {i + 1}: {ln.rstrip()!r} in hunk {hunk.header!r} starts with "
                             f"neither ' ', '-' nor '+' (the hunk's line counts say more lines follow)")
        seen_old += tag in " -"
        seen_new += tag in " +"
        hunk.lines.append(ln)
        i += 1
    if seen_old != old_len or seen_new != new_len:
        raise PatchError(f"{source}: line {start + 1}: hunk {hunk.header!r} has {seen_old} old and {seen_new} "
                         "new lines, which does not match its header")
    if i < len(lines) and lines[i].startswith("\\"):
        _drop_newline(hunk)
        i += 1
    return hunk, i


def _drop_newline(hunk: Hunk) -> None:
    if hunk.lines:
        hunk.lines[-1] = hunk.lines[-1].rstrip("\r\n") if hunk.lines[-1].endswith("\n") else hunk.lines[-1]


def _find(haystack: list[str], needle: list[str], expected: int, lo: int) -> int | None:
    """Index ≥ lo where needle occurs in haystack, nearest to `expected`."""
    n = len(needle)
    last = len(haystack) - n
    if last < lo:
        return None
    expected = min(max(expected, lo), last)
    for d in range(0, max(expected - lo, last - expected) + 1):
        for pos in (expected - d, expected + d) if d else (expected,):
            if lo <= pos <= last and haystack[pos:pos + n] == needle:
                return pos
    return None


def apply_file_patch(text: str, fp: FilePatch, source: str = "patch", target: str = "the script") -> str:
    """`text` with every hunk of `fp` applied; PatchError quoting the first hunk that does not apply."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    pos = 0  # next unconsumed line of `lines`
    offset = 0  # where the previous hunk actually applied, relative to its header
    for k, hunk in enumerate(fp.hunks, start=1):
        old = hunk.old()
        # a zero-length preimage (pure insertion) sits after line old_start
        expected = (hunk.old_start if not old else hunk.old_start - 1) + offset
        at = _find(lines, old, expected, pos)
        if at is None:
            raise PatchError(f"{source}: hunk {k} of {len(fp.hunks)} does not apply to {target}: "
                             f"{_mismatch(lines, old, expected)}; the hunk:\n{hunk.text()}\n"
                             "    fix: regenerate the diff against this version of the script (git diff), or point "
                             "the arm at the script the diff was made from")
        out += lines[pos:at]
        out += hunk.new()
        pos = at + len(old)
        offset = at - (hunk.old_start if not old else hunk.old_start - 1)
    out += lines[pos:]
    return "".join(out)


def _mismatch(lines: list[str], old: list[str], expected: int) -> str:
    """Where the preimage first differs from the text at the hunk's stated position."""
    if expected >= len(lines) and old:
        return f"its preimage starts at line {expected + 1}, past the end of the file ({len(lines)} lines)"
    for j, want in enumerate(old):
        have = lines[expected + j] if expected + j < len(lines) else None
        if have != want:
            got = "the end of the file" if have is None else repr(have.rstrip("\n"))
            return (f"its text is nowhere in the file; at line {expected + j + 1} the hunk expects "
                    f"{want.rstrip(chr(10))!r} but the file has {got}")
    return "its preimage overlaps an earlier hunk"
