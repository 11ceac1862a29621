"""Schedules at the boundary steps of both records (trainer-spec §1c).

    python -m pytest tests/trainer/test_schedule.py -q
"""
import pytest

from trainer.presets import load_config
from trainer.schedule import batch_tokens, lr_multiplier, muon_momentum, stages, total_tokens, window_blocks

S1211 = load_config("speedrun").schedule
S1027 = load_config("speedrun-1027").schedule
M1211 = load_config("speedrun").optim.muon


def test_1211_lr_stages_and_jump_at_1400():
    assert lr_multiplier(S1211, 0) == 1.0
    assert lr_multiplier(S1211, 699) == 1.0
    assert lr_multiplier(S1211, 700) == 1.51
    assert lr_multiplier(S1211, 953) == 1.51  # last step before the cooldown
    assert lr_multiplier(S1211, 1399) == pytest.approx(0.972, abs=5e-4)
    assert lr_multiplier(S1211, 1400) == pytest.approx(1.230, abs=5e-4)  # jumps up: lr_max 1.51 → 1.93


def test_1211_cooldown_starts_at_954_and_is_linear():
    def expected(step, lr_max):
        w = (1 - step / 2120) / 0.55
        return lr_max * w + 0.1 * (1 - w)

    assert lr_multiplier(S1211, 954) == pytest.approx(1.51)  # w = 1 exactly at x = 0.45
    for step in (955, 1000, 1399):
        assert lr_multiplier(S1211, step) == pytest.approx(expected(step, 1.51), rel=1e-12)
    for step in (1400, 2000, 2119):
        assert lr_multiplier(S1211, step) == pytest.approx(expected(step, 1.93), rel=1e-12)
    assert lr_multiplier(S1211, 955) < lr_multiplier(S1211, 954)


def test_1211_flat_extension():
    assert lr_multiplier(S1211, 2120) == pytest.approx(0.1)
    for step in range(2121, 2160):
        assert lr_multiplier(S1211, step) == 0.1


def test_1027_decay_start_and_extension():
    assert lr_multiplier(S1027, 1122) == 1.0
    w = (1 - 1123 / 2245) / 0.5
    assert lr_multiplier(S1027, 1123) == pytest.approx(w + 0.1 * (1 - w))
    assert lr_multiplier(S1027, 1123) < 1.0
    for step in range(2245, 2285):
        assert lr_multiplier(S1027, step) == pytest.approx(0.10018, abs=1e-5)  # x clamped at 0.9999
        assert abs(lr_multiplier(S1027, step) - 0.1002) < 1e-4


@pytest.mark.parametrize("step,long", [(0, 3), (706, 3), (707, 7), (1413, 7), (1414, 11), (2119, 11),
                                       (2120, 13), (2159, 13)])
def test_1211_windows(step, long):
    assert window_blocks(S1211, step) == (long, long // 2)


@pytest.mark.parametrize("step,bs", [(0, 131072), (706, 131072), (707, 262144), (1413, 262144),
                                     (1414, 393216), (2119, 393216), (2120, 393216), (2159, 393216)])
def test_1211_batch(step, bs):
    assert batch_tokens(S1211, step) == bs


def test_1027_batch_fixed_and_windows():
    assert {batch_tokens(S1027, s) for s in range(S1027.num_iterations)} == {262144}
    assert window_blocks(S1027, 748) == (3, 1)  # 3·748/2245 < 1
    assert window_blocks(S1027, 749) == (7, 3)
    assert window_blocks(S1027, 2245) == (13, 6)


def test_momentum_1211():
    assert muon_momentum(M1211, S1211, 0) == pytest.approx(0.85)
    assert muon_momentum(M1211, S1211, 150) == pytest.approx(0.90)
    assert muon_momentum(M1211, S1211, 300) == pytest.approx(0.95)
    assert muon_momentum(M1211, S1211, 2110) == pytest.approx(0.95)  # cooldown starts after 2110
    assert muon_momentum(M1211, S1211, 2111) == pytest.approx(0.95 - 0.1 / 50)
    assert muon_momentum(M1211, S1211, 2159) == pytest.approx(0.95 - 0.1 * 49 / 50)


def test_momentum_1027_cooldown_after_2235():
    m = load_config("speedrun-1027").optim.muon
    assert muon_momentum(m, S1027, 2235) == pytest.approx(0.95)
    assert muon_momentum(m, S1027, 2236) < 0.95


def test_stages_and_tokens():
    assert stages(S1211) == [(3, 131072), (7, 262144), (11, 393216), (13, 393216)]
    assert stages(S1027) == [(3, 262144), (7, 262144), (11, 262144), (13, 262144)]
    assert total_tokens(S1027) == 2285 * 262144
    assert total_tokens(S1211) == 707 * 131072 + 707 * 262144 + 706 * 393216 + 40 * 393216


def test_tiny_schedule_parts():
    s = load_config("tiny").schedule
    assert [window_blocks(s, i)[0] for i in (0, 19, 20, 39, 40, 59, 60, 63)] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert [batch_tokens(s, i) for i in (0, 19, 20, 60)] == [2048, 2048, 4096, 4096]


def test_short_window_ratio_knob():
    """schedule.short_window_ratio: short = floor(long · ratio); 0.5 is the records' long // 2."""
    from trainer.config import apply_overrides
    from trainer.presets import load_config

    base = load_config("speedrun").schedule
    assert [window_blocks(base, s)[1] for s in (0, 1000, 2000, 2150)] == [1, 3, 5, 6]
    third = apply_overrides(load_config("speedrun"), {"schedule.short_window_ratio": 1 / 3}).schedule
    assert [window_blocks(third, s) for s in (0, 1000, 2000, 2150)] == [(3, 1), (7, 2), (11, 3), (13, 4)]
    full = apply_overrides(load_config("speedrun"), {"schedule.short_window_ratio": 1.0}).schedule
    assert window_blocks(full, 2150) == (13, 13)
