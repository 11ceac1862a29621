"""Step schedules of the trainer: LR multiplier, attention window, batch size, Muon momentum.

Pure functions of (config section, step), trainer-spec §1c. `step` is the 0-based index of the
optimizer step about to be taken (step k is the update that turns k completed steps into k+1).

    from trainer.schedule import lr_multiplier, window_blocks, batch_tokens, muon_momentum
    python -m pytest tests/trainer/test_schedule.py -q
"""
from __future__ import annotations

import math

from trainer.config import MuonConfig, ScheduleConfig


def lr_multiplier(s: ScheduleConfig, step: int) -> float:
    """LR multiplier shared by both optimizers.

    x = step / N. The peak lr_max is lr_max_stages[i] where i counts the thresholds below x.
    Before the cooldown (x < 1 − cooldown_frac) the multiplier is lr_max; during it,
    lr_max·w + lr_final·(1 − w) with w = (1 − x) / cooldown_frac. Extension steps (step > N) give
    exactly lr_final when lr_flat_extension (12-11), otherwise x is clamped at 0.9999 (10-27).
    """
    n = s.num_scheduled_iterations
    if s.lr_flat_extension:
        if step > n:
            return s.lr_final
        x = step / n
    else:
        x = min(0.9999, step / n)
    lr_max = s.lr_max_stages[sum(1 for t in s.lr_max_thresholds if x > t)]
    if s.cooldown_frac <= 0.0 or x < 1.0 - s.cooldown_frac:
        return lr_max
    w = (1.0 - x) / s.cooldown_frac
    return lr_max * w + s.lr_final * (1.0 - w)


def _part(n_parts: int, step: int, n: int) -> int:
    """Index of the equal part of the schedule that `step` falls in: int(n_parts·step/N)."""
    return min(n_parts - 1, n_parts * step // n)


def short_window(s: ScheduleConfig, long: int) -> int:
    """Short window (blocks) for a long one: floor(long · short_window_ratio); the records' long // 2."""
    return int(math.floor(long * s.short_window_ratio + 1e-9))


def window_blocks(s: ScheduleConfig, step: int) -> tuple[int, int]:
    """(long, short) attention window in blocks of s.block_size tokens; short = short_window(long)."""
    n = s.num_scheduled_iterations
    long = s.ws_final if step >= n else s.ws_schedule[_part(len(s.ws_schedule), step, n)]
    return long, short_window(s, long)


def batch_tokens(s: ScheduleConfig, step: int) -> int:
    """Global training tokens of the optimizer step `step`."""
    n = s.num_scheduled_iterations
    if step >= n:
        return s.train_bs_extension
    return s.train_bs_schedule[_part(len(s.train_bs_schedule), step, n)]


def muon_momentum(m: MuonConfig, s: ScheduleConfig, step: int) -> float:
    """NorMuon momentum: linear min → max over the warmup steps, max, then linear back toward min
    over the last momentum_cooldown_steps (for step > num_iterations − cooldown)."""
    lo, hi = m.momentum_min, m.momentum_max
    cd_start = s.num_iterations - m.momentum_cooldown_steps
    if step < m.momentum_warmup_steps:
        return lo + (step / m.momentum_warmup_steps) * (hi - lo)
    if m.momentum_cooldown_steps > 0 and step > cd_start:
        return hi - ((step - cd_start) / m.momentum_cooldown_steps) * (hi - lo)
    return hi


def stages(s: ScheduleConfig) -> list[tuple[int, int]]:
    """Distinct (long window, batch tokens) pairs in the order training meets them (warmup)."""
    seen: list[tuple[int, int]] = []
    for step in range(s.num_iterations):
        key = (window_blocks(s, step)[0], batch_tokens(s, step))
        if key not in seen:
            seen.append(key)
    return seen


def total_tokens(s: ScheduleConfig) -> int:
    """Global training tokens over the whole run."""
    return sum(batch_tokens(s, step) for step in range(s.num_iterations))


__all__ = ["lr_multiplier", "short_window", "window_blocks", "batch_tokens", "muon_momentum", "stages", "total_tokens"]
