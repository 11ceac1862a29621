"""Optuna study handling: storage location, resume checks, samplers, Pareto front, ranking.

    python -m pytest tests/ablate/test_study.py -q
"""
from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from ablate.spec.search_space import SearchSpaceError, parse_search
from ablate.search.study import (
    ATTR_INTERRUPTED, ATTR_MEAN, ATTR_N, counts_toward_budget, make_sampler, open_study,
    pareto_front, pareto_mask, ranked, storage_url,
)

SPACE = {
    "optim.lr_mul.attn": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
    "schedule.ws_schedule": {"type": "choice", "values": [[2, 4, 6], [2, 4, 6, 8]]},
}


def cfg_of(**kw):
    return parse_search({"trials": 6, "space": SPACE, **kw}, preset="tiny")


def test_storage_url_choices(tmp_path, monkeypatch):
    assert storage_url(str(tmp_path / "res"), "e1") == f"sqlite:///{tmp_path}/res/e1/optuna.db"
    assert storage_url(f"file://{tmp_path}/res", "e1") == f"sqlite:///{tmp_path}/res/e1/optuna.db"
    monkeypatch.chdir(tmp_path)
    assert storage_url("s3://bucket/prefix", "e1") == f"sqlite:///{tmp_path}/.ablate/optuna/e1.db"
    assert storage_url("s3://b/p", "e1", explicit="postgresql://u@h/db") == "postgresql://u@h/db"


def test_create_then_resume_same_study(tmp_path):
    cfg = cfg_of()
    url = storage_url(str(tmp_path), "exp")
    s1 = open_study(cfg, "exp", url)
    t = s1.ask(cfg.distributions())
    s1.tell(t, 3.5)
    assert (tmp_path / "exp" / "optuna.db").exists()
    s2 = open_study(cfg_of(trials=20, sampler="random"), "exp", url)  # budget/sampler may change
    assert [x.number for x in s2.trials] == [0] and s2.trials[0].value == 3.5
    assert s2.directions == [optuna.study.StudyDirection.MINIMIZE]


def test_resume_with_other_space_or_objectives_is_an_error(tmp_path):
    url = storage_url(str(tmp_path), "exp")
    open_study(cfg_of(), "exp", url)
    with pytest.raises(SearchSpaceError, match="objective"):
        open_study(cfg_of(objectives=["val_loss", "train_time"]), "exp", url)
    space = {**SPACE, "optim.lr_mul.attn": {"type": "float", "low": 0.5, "high": 3.0}}
    with pytest.raises(SearchSpaceError, match="different search space"):
        open_study(parse_search({"trials": 6, "space": space}, preset="tiny"), "exp", url)


@pytest.mark.parametrize("name, cls", [("tpe", optuna.samplers.TPESampler),
                                       ("gp", optuna.samplers.GPSampler),
                                       ("nsga2", optuna.samplers.NSGAIISampler),
                                       ("random", optuna.samplers.RandomSampler)])
def test_sampler_factory(name, cls):
    assert isinstance(make_sampler(cfg_of(sampler=name)), cls)


def test_resumed_random_sampler_does_not_replay_draws():
    cfg = cfg_of(sampler="random", sampler_seed=3)

    def first_draw(n_existing):
        study = optuna.create_study(sampler=make_sampler(cfg, n_existing))
        return study.ask(cfg.distributions()).params["optim.lr_mul.attn"]

    assert first_draw(0) == first_draw(0)  # seeded
    assert first_draw(0) != first_draw(4)  # a resumed session starts elsewhere


def test_pareto_mask():
    pts = np.array([[1.0, 5.0], [1.1, 4.0], [1.2, 3.0], [1.0, 2.0], [1.1, 1.0], [np.nan, 0.0], [1.0, 2.0]])
    assert pareto_mask(pts).tolist() == [False, False, False, True, True, False, True]
    assert pareto_mask(np.zeros((0, 2))).tolist() == []


def test_two_objective_front_ranking_and_frame(tmp_path):
    cfg = cfg_of(objectives=["val_loss", "train_time"], sampler="random")
    study = open_study(cfg, "mo", storage_url(str(tmp_path), "mo"))
    values = [(1.0, 5.0), (1.1, 4.0), (1.2, 3.0), (1.0, 2.0), (1.1, 1.0)]
    for v in values:
        t = study.ask(cfg.distributions())
        t.set_user_attr(ATTR_N, 2)
        t.set_user_attr(ATTR_MEAN, list(v))
        study.tell(t, list(v))
    t = study.ask(cfg.distributions())
    t.set_user_attr(ATTR_INTERRUPTED, True)
    study.tell(t, state=TrialState.FAIL)
    assert [t.number for t in pareto_front(study)] == [3, 4]
    assert [t.number for t in ranked(study, 3)] == [3, 4, 0]  # front first, then by loss
    assert [counts_toward_budget(t) for t in study.trials] == [True] * 5 + [False]


def test_single_objective_ranking(tmp_path):
    cfg = cfg_of()
    study = open_study(cfg, "so", storage_url(str(tmp_path), "so"))
    for v in (3.3, 3.1, 3.2):
        study.tell(study.ask(cfg.distributions()), v)
    study.tell(study.ask(cfg.distributions()), state=TrialState.FAIL)
    assert [t.number for t in ranked(study, 2)] == [1, 2]
    assert [counts_toward_budget(t) for t in study.trials] == [True, True, True, True]
