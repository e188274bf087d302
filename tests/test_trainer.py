"""Single-process trainer on a tiny planted problem: learning, determinism, early stopping,
bf16 autocast (``train.precision``)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import get_args, get_type_hints

import numpy as np
import pytest
import torch

from frame_dist.config import EvaluateConfig, ModelConfig, TrainConfig
from frame_dist.graph.clip_graph import Interactions, build_graph, to_torch
from frame_dist.model.calibration import Calibration, fit_platt
from frame_dist.model.frame import FRAME
from frame_dist.model.loss import FRAMETrainTask, InteractionBatch
from frame_dist.model.metrics import all_metrics
from frame_dist.train import trainer
from frame_dist.train.loop import EpochRecord, SplitError
from frame_dist.train.trainer import (
    EvalData,
    Precision,
    TrainData,
    autocast_dtype,
    autocast_for,
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
    # two batchings sum in different orders: equal to float rounding, not bit for bit
    expected = all_metrics(valid.users, valid.labels, logits, (3, 5))
    assert metrics.keys() == expected.keys()
    assert metrics == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_without_negatives_the_pairwise_loss_is_off(planted) -> None:
    cfg = dataclasses.replace(MODEL_CFG, use_negative=False)
    assert build_loss(_cfg(), cfg.use_negative).beta == 0.0 and build_loss(
        _cfg(), MODEL_CFG.use_negative).beta == 1.0
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
    # the message names the split and its counts; an empty split is refused alike
    n = len(valid.labels)
    with pytest.raises(SplitError, match=rf"split 'valid' has {n} row\(s\), {n} full watch\(es\) "
                                         r"and 0 skip\(s\)"):
        train(model, planted["x"], planted["graph"], planted["train"], one_class, _cfg())
    empty = EvalData(valid.users[:0], valid.videos[:0], valid.labels[:0])
    with pytest.raises(SplitError, match=r"split 'valid' has 0 row\(s\), 0 full watch"):
        train(model, planted["x"], planted["graph"], planted["train"], empty, _cfg())


def test_history_keys_and_test_pass(planted) -> None:
    """Every epoch records the loop's keys (the Ray Train workers record the same); the final
    test pass scores the best weights, which the model ends with."""
    model = build_model(MODEL_CFG, F, seed=0)
    valid = planted["valid"]
    result = train(model, planted["x"], planted["graph"], planted["train"], valid,
                   _cfg(epochs=2), test_data=valid)
    keys = {f.name for f in dataclasses.fields(EpochRecord)}
    assert all(set(entry) == keys for entry in result.history)
    assert result.history[0]["steps"] == -(-len(planted["train"]) // 128)
    assert result.history[0]["propagation_bytes_per_step"] == 0  # one process sends nothing
    assert result.history[0]["optimizer_state_bytes"] > 0  # Adam's moments
    assert result.test == result.best_metrics  # the test pass ran on the best weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.best_state[key]), key
    assert result.state.best_epoch == result.best_epoch and result.state.done


def test_patience_counts_epochs_without_a_better_auc(planted) -> None:
    """The first epoch is always the best so far (the best AUC starts at -inf); then patience
    epochs without a better AUC stop the run, whatever the remaining epochs."""
    for patience in (1, 3):
        model = build_model(MODEL_CFG, F, seed=0)
        result = train(model, planted["x"], planted["graph"], planted["train"],
                       planted["valid"], _cfg(epochs=10, lr=0.0, patience=patience))
        assert result.state.best_auc == result.history[0]["valid"]["auc"]
        assert len(result.history) == 1 + patience and result.stopped_early
    model = build_model(MODEL_CFG, F, seed=0)
    result = train(model, planted["x"], planted["graph"], planted["train"], planted["valid"],
                   _cfg(epochs=3, lr=0.0, patience=5))
    assert len(result.history) == 3 and not result.stopped_early and result.state.done


# --------------------------------------------------------------------------- train.precision


@pytest.mark.parametrize("device_type, precision, expected", [
    ("cpu", "auto", None), ("cpu", "fp32", None), ("cpu", "bf16", torch.bfloat16),
    ("cuda", "auto", torch.bfloat16), ("cuda", "fp32", None), ("cuda", "bf16", torch.bfloat16),
])
def test_autocast_dtype_of_each_precision(device_type, precision, expected) -> None:
    assert autocast_dtype(device_type, precision) == expected


def test_precision_names_match_the_config_and_bad_ones_are_refused() -> None:
    assert get_args(get_type_hints(TrainConfig)["precision"]) == get_args(Precision)
    with pytest.raises(ValueError, match=r"train.precision='fp16' must be one of \['auto', "
                                         r"'fp32', 'bf16'\]"):
        autocast_for("cpu", "fp16")  # type: ignore[arg-type]


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch) -> None:
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"train.precision='bf16' on a CPU without bf16 "
                                            r"instructions .* slower than train.precision='fp32'"):
        autocast_for("cpu", "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autocast_for("cpu", "fp32")  # fp32 and auto ask nothing of the CPU
        autocast_for("cpu", "auto")


def _step(planted, model: FRAME, precision: str):
    """Loss and gradients of one training step on the first 256 training interactions."""
    task = FRAMETrainTask(model, build_loss(_cfg(), MODEL_CFG.use_negative), planted["x"],
                          planted["graph"])
    td = planted["train"]
    batch = InteractionBatch(*(torch.as_tensor(a[:256]) for a in (td.users, td.videos,
                                                                     td.watched)))
    model.zero_grad(set_to_none=True)
    with autocast_for("cpu", precision):
        loss, _ = task(batch)
        linear_out = model.input_proj(planted["x"][:2])
    loss.backward()
    return loss.detach(), linear_out, {k: p.grad for k, p in model.named_parameters()}


def test_bf16_step_on_cpu_is_close_to_fp32(planted) -> None:
    model = build_model(MODEL_CFG, F, seed=0)
    loss32, out32, grads32 = _step(planted, model, "fp32")
    loss16, out16, grads16 = _step(planted, model, "bf16")
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16  # autocast was on
    assert loss16.dtype == torch.float32  # the loss is computed in fp32 from bf16 scores
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    for name, p in model.named_parameters():  # master weights and gradients stay fp32
        assert p.dtype == grads16[name].dtype == torch.float32, name
        assert torch.isfinite(grads16[name]).all(), name
    flat32 = torch.cat([g.reshape(-1) for g in grads32.values()])
    flat16 = torch.cat([grads16[k].reshape(-1) for k in grads32])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.99


def test_training_under_bf16_learns_as_fp32(planted) -> None:
    runs = {}
    for precision in ("fp32", "bf16"):
        model = build_model(MODEL_CFG, F, seed=0)
        runs[precision] = train(model, planted["x"], planted["graph"], planted["train"],
                                planted["valid"], _cfg(precision=precision))
        assert all(v.dtype == torch.float32 for v in runs[precision].best_state.values())
    auc32, auc16 = (runs[p].best_metrics["auc"] for p in ("fp32", "bf16"))
    assert auc16 > 0.9 and auc16 == pytest.approx(auc32, abs=0.02)


# --------------------------------------------------------------------------- metrics, calibration


def test_metrics_in_training_are_fp32_under_bf16(planted) -> None:
    """train.precision=bf16 trains under autocast, yet the validation and test metrics come from
    fp32 logits: the in-training test metrics equal ``evaluate``'s (the evaluate stage's path)
    on the best weights, and bf16 logits would not."""
    model = build_model(MODEL_CFG, F, seed=0)
    valid = planted["valid"]
    result = train(model, planted["x"], planted["graph"], planted["train"], valid,
                   _cfg(epochs=2, precision="bf16"), test_data=valid)
    clone = FRAME(**model.model_args())
    clone.load_state_dict(result.best_state)
    again = evaluate(clone, planted["x"], planted["graph"], valid.users, valid.videos,
                     valid.labels, calibration=result.calibration)
    assert again.keys() == result.test.keys()
    for key, value in again.items():
        assert result.test[key] == pytest.approx(value, abs=1e-6), key
    best_epoch = result.history[result.best_epoch - 1]["valid"]
    assert best_epoch["auc"] == pytest.approx(again["auc"], abs=1e-6)
    assert best_epoch["logloss_raw"] == pytest.approx(again["logloss_raw"], abs=1e-6)
    logits16 = predict(clone, planted["x"], planted["graph"], valid.users, valid.videos,
                       precision="bf16")
    bf16 = all_metrics(valid.users, valid.labels, logits16, (3, 5), result.calibration)
    assert max(abs(bf16[k] - again[k]) for k in ("auc", "logloss", "ndcg@5")) > 1e-6


def test_training_calibrates_the_best_weights_on_validation(planted) -> None:
    model = build_model(MODEL_CFG, F, seed=0)
    planted_valid = planted["valid"]
    flip = np.random.default_rng(0).random(len(planted_valid.labels)) < 0.1  # label noise:
    valid = EvalData(planted_valid.users, planted_valid.videos,  # the classes overlap, so the
                     planted_valid.labels ^ flip)  # best slope is finite (not the identity)
    result = train(model, planted["x"], planted["graph"], planted["train"], valid, _cfg())
    logits = predict(model, planted["x"], planted["graph"], valid.users, valid.videos)
    # the model ends with the best weights (training scored them from precomputed R~ X,
    # predict from the features: the same logits up to the order of additions)
    expected = fit_platt(logits, valid.labels)
    assert (result.calibration.a, result.calibration.b) == pytest.approx((expected.a, expected.b),
                                                                         rel=1e-6)
    assert not result.calibration.is_identity
    metrics, best_epoch = result.best_metrics, result.history[result.best_epoch - 1]["valid"]
    assert metrics["logloss"] < metrics["logloss_raw"] == pytest.approx(best_epoch["logloss"])
    assert metrics["logloss"] == pytest.approx(
        all_metrics(valid.users, valid.labels, logits, (3, 5), result.calibration)["logloss"])
    for key in ("auc", "recall@3", "ndcg@3", "recall@5", "ndcg@5"):  # a monotone map
        assert metrics[key] == best_epoch[key], key
    # without a validation split there is nothing to fit: the identity
    model = build_model(MODEL_CFG, F, seed=0)
    alone = train(model, planted["x"], planted["graph"], planted["train"], None, _cfg(epochs=1))
    assert alone.calibration == Calibration() and alone.best_metrics == {}
