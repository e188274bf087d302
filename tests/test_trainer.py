"""Single-process trainer on a tiny planted problem: learning, determinism, early stopping."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from frame_dist.config import EvaluateConfig, ModelConfig, TrainConfig
from frame_dist.graph import Interactions, build_graph, to_torch
from frame_dist.metrics import all_metrics
from frame_dist.model import FRAME
from frame_dist.trainer import (
    EvalData,
    TrainData,
    build_loss,
    build_model,
    evaluate,
    predict,
    train,
)

M, N, N_C, F = 80, 60, 4, 8
MODEL_CFG = ModelConfig(dim=16, hidden=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted():
    """Two user groups; group g skips a video at its first clip whose feature g exceeds 0.6.

    A user's group is visible only through the clips they watched and skipped, so a model
    must combine the graph with the clip features to rank well.
    """
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(N * N_C, F)).astype(np.float32)
    group = rng.integers(0, 2, M)
    per_user = 25
    u = np.repeat(np.arange(M), per_user)
    v = np.concatenate([rng.choice(N, per_user, replace=False) for _ in range(M)])
    clip_ids = v[:, None] * N_C + np.arange(N_C)  # (n, N_c)
    dislike = feats[clip_ids, group[u][:, None]] > 0.6  # (n, N_c)
    first = np.where(dislike.any(1), dislike.argmax(1), N_C)
    full = first == N_C
    r = np.where(full, 1.0, (first + rng.uniform(0.1, 0.9, len(u))) / N_C)
    test = rng.random(len(u)) < 0.2
    train_rows = Interactions(u[~test], v[~test], r[~test], full[~test])
    graph = to_torch(build_graph(train_rows.user_idx, train_rows.video_idx,
                                 train_rows.watch_ratio, train_rows.full_watch,
                                 n_users=M, n_videos=N, n_clips=N_C))
    return dict(graph=graph, x=torch.from_numpy(feats),
                train=TrainData.from_interactions(train_rows, N_C),
                valid=EvalData(u[test], v[test], full[test].astype(np.int64)))


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=4, batch_size=128, lr=1e-2, patience=10, seed=3, use_gpu=False)
    base.update(kw)
    return TrainConfig(**base)


def test_train_data_labels(planted) -> None:
    td = planted["train"]
    assert td.watched.min() >= 0 and td.watched.max() == N_C
    with pytest.raises(ValueError, match=r"videos \(2,\) and watched \(3,\) must have the same"):
        TrainData(np.zeros(3, np.int64), np.zeros(2, np.int64), np.zeros(3, np.int64))


def test_training_learns_the_planted_preferences(planted) -> None:
    model = build_model(MODEL_CFG, F, seed=0)
    valid = planted["valid"]
    before = evaluate(model, planted["x"], planted["graph"], valid.users, valid.videos,
                      valid.labels)
    result = train(model, planted["x"], planted["graph"], planted["train"], valid, _cfg())
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert result.best_metrics["auc"] > 0.9 > before["auc"] + 0.1
    assert set(result.best_metrics) >= {"auc", "logloss", "recall@3", "ndcg@3", "recall@5",
                                        "ndcg@5"}
    # the best state rebuilds the model from its arguments alone and reproduces the metrics
    clone = FRAME(**model.model_args())
    clone.load_state_dict(result.best_state)
    again = evaluate(clone, planted["x"], planted["graph"], valid.users, valid.videos,
                     valid.labels)
    assert again["auc"] == pytest.approx(result.best_metrics["auc"], abs=1e-9)
    assert result.history[result.best_epoch - 1]["valid"]["auc"] == result.best_metrics["auc"]


def test_training_is_deterministic(planted) -> None:
    runs = []
    for _ in range(2):
        model = build_model(MODEL_CFG, F, seed=5)
        runs.append(train(model, planted["x"], planted["graph"], planted["train"],
                          planted["valid"], _cfg(epochs=2)))
    a, b = runs
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    for key, value in a.best_state.items():
        assert torch.equal(value, b.best_state[key]), key


def test_early_stopping_on_validation_auc(planted) -> None:
    model = build_model(MODEL_CFG, F, seed=0)
    result = train(model, planted["x"], planted["graph"], planted["train"], planted["valid"],
                   _cfg(epochs=10, lr=0.0, patience=2))  # lr 0: AUC never improves
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


def test_evaluate_equals_metrics_of_restricted_scores(planted) -> None:
    model = build_model(MODEL_CFG, F, seed=1)
    valid = planted["valid"]
    logits = predict(model, planted["x"], planted["graph"], valid.users, valid.videos,
                     batch_size=37)
    pairs = model.score_pairs(planted["x"], planted["graph"], torch.from_numpy(valid.users),
                              torch.from_numpy(valid.videos)).detach().numpy()
    np.testing.assert_allclose(logits, pairs, atol=1e-5, rtol=1e-5)
    metrics = evaluate(model, planted["x"], planted["graph"], valid.users, valid.videos,
                       valid.labels, ks=(3, 5), batch_size=50)
    assert metrics == all_metrics(valid.users, valid.labels, logits, (3, 5))


def test_without_negatives_the_pairwise_loss_is_off(planted) -> None:
    cfg = dataclasses.replace(MODEL_CFG, use_negative=False)
    assert build_loss(_cfg(), cfg).beta == 0.0 and build_loss(_cfg(), MODEL_CFG).beta == 1.0
    model = build_model(cfg, F, seed=0)
    result = train(model, planted["x"], planted["graph"], planted["train"], None, _cfg(epochs=1),
                   EvaluateConfig())
    assert result.history[0]["pairwise"] == 0.0 and np.isfinite(result.history[0]["loss"])
    assert result.best_epoch == 1 and "valid" not in result.history[0]


def test_bad_validation_set_is_refused(planted) -> None:
    model = build_model(MODEL_CFG, F, seed=0)
    valid = planted["valid"]
    one_class = EvalData(valid.users, valid.videos, np.ones_like(valid.labels))
    with pytest.raises(ValueError, match="validation set needs both full watches and skips"):
        train(model, planted["x"], planted["graph"], planted["train"], one_class, _cfg())
