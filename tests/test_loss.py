"""Hybrid loss (eqs. 14-16) against hand computations, and the one-batch train task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from frame_dist.graph.clip_graph import build_graph, clip_labels, to_torch
from frame_dist.model.frame import FRAME, FrameOutput
from frame_dist.model.loss import FRAMETrainTask, HybridLoss, InteractionBatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def log_sig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def log_one_minus_sig(x: float) -> float:
    return -math.log1p(math.exp(x))


CLIP_SCORES = [[0.5, -1.0, 2.0, 0.3],   # watched = 2: clips 0, 1 positive, clip 2 skipped
               [1.0, 2.0, 3.0, 4.0],    # watched = 4: full watch, all positive
               [0.2, 0.1, -0.3, 0.4]]   # watched = 0: clip 0 skipped, nothing watched
WATCHED = [2, 4, 0]
WATCHED_SCORES = [0.7, 9.0, 9.0]  # only row 0 forms a BPR pair

# eq. 14 by hand, eps_j = j / 4 with 1-based j
POINT_SUM = -(0.25 * log_sig(0.5) + 0.5 * log_sig(-1.0) + log_one_minus_sig(2.0)
              + 0.25 * log_sig(1.0) + 0.5 * log_sig(2.0) + 0.75 * log_sig(3.0)
              + 1.0 * log_sig(4.0)
              + log_one_minus_sig(0.2))
PAIR_SUM = -log_sig(0.7 - 2.0)  # eq. 15: watched mean (0.7) against the skip clip (2.0)


def _output() -> tuple[FrameOutput, torch.Tensor]:
    return (FrameOutput(torch.tensor(CLIP_SCORES), torch.tensor(WATCHED_SCORES)),
            torch.tensor(WATCHED))


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
def test_loss_equals_hand_computation(alpha: float, beta: float) -> None:
    out, watched = _output()
    loss, stats = HybridLoss(alpha=alpha, beta=beta, l2=0.0)(out, watched)
    expected = (alpha * POINT_SUM + beta * PAIR_SUM) / 3  # per-batch mean over 3 interactions
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["pointwise"].item() == pytest.approx(POINT_SUM / 3, rel=1e-6)
    assert stats["pairwise"].item() == pytest.approx(PAIR_SUM / 3 if beta else 0.0, rel=1e-6)
    assert (stats["n_pos"].item(), stats["n_neg"].item(), stats["n_pairs"].item()) == (6, 2, 1)


def test_hand_value_literal() -> None:
    """The same batch as a number, so a change to the formula cannot go unnoticed."""
    out, watched = _output()
    loss, _ = HybridLoss(1.0, 1.0, 0.0)(out, watched)
    # 0.25 ln(1+e^-0.5) + 0.5 ln(1+e) + ln(1+e^2) + 0.25 ln(1+e^-1) + 0.5 ln(1+e^-2)
    # + 0.75 ln(1+e^-3) + ln(1+e^-4) + ln(1+e^0.2) = 0.118519 + 0.656631 + 2.126928 + 0.078315
    # + 0.063464 + 0.036440 + 0.018150 + 0.798139
    assert POINT_SUM == pytest.approx(3.896587, rel=1e-5)
    assert PAIR_SUM == pytest.approx(1.541018, rel=1e-5)  # ln(1 + e^1.3)
    assert loss.item() == pytest.approx((3.896587 + 1.541018) / 3, rel=1e-5)


def test_l2_term_and_denominator() -> None:
    out, watched = _output()
    params = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])]  # ||Theta||^2 = 14
    loss, stats = HybridLoss(1.0, 1.0, l2=0.01)(out, watched, params, denominator=12)
    assert stats["l2"].item() == pytest.approx(14.0)
    assert loss.item() == pytest.approx((POINT_SUM + PAIR_SUM) / 12 + 0.14, rel=1e-6)


def test_extreme_scores_stay_finite() -> None:
    out = FrameOutput(torch.tensor([[-200.0, 300.0], [500.0, -400.0]], requires_grad=True),
                      torch.tensor([-300.0, 0.0]))
    loss, _ = HybridLoss()(out, torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.clip_scores.grad).all()
    # row 0: -eps_1 log sig(-200) = 0.5 * 200, skip clip -log(1 - sig(300)) = 300,
    # pair -log sig(-300 - 300) = 600; row 1 full: -0.5 log sig(500) - 1.0 log sig(-400) = 400
    assert loss.item() == pytest.approx((100 + 300 + 600 + 400) / 2, rel=1e-5)


def test_bad_labels_raise() -> None:
    out, _ = _output()
    with pytest.raises(ValueError, match=r"watched must be in \[0, 4\], got values \[5\]"):
        HybridLoss()(out, torch.tensor([1, 5, 0]))
    with pytest.raises(ValueError, match=r"watched has shape \(2,\), expected \(3,\)"):
        HybridLoss()(out, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must be >= 0"):
        HybridLoss(alpha=-1.0)


@pytest.fixture
def task_setup():
    rng = np.random.default_rng(0)
    n, m, nv, nc, f = 40, 6, 5, 4, 8
    u, v = rng.integers(0, m, n), rng.integers(0, nv, n)
    r = np.round(rng.random(n), 2)
    full = r > 0.75
    graph = to_torch(build_graph(u, v, r, full, n_users=m, n_videos=nv, n_clips=nc))
    torch.manual_seed(0)
    model = FRAME(f, dim=6, hidden=10)
    x = torch.randn(nv * nc, f)
    batch = InteractionBatch(torch.from_numpy(u), torch.from_numpy(v),
                             torch.from_numpy(clip_labels(r, full, nc)))
    return model, x, graph, batch


def test_train_task_equals_model_plus_loss(task_setup) -> None:
    model, x, graph, batch = task_setup
    loss_fn = HybridLoss(1.0, 0.5, 1e-3)
    task = FRAMETrainTask(model, loss_fn, x, graph)
    loss, stats = task(batch)
    out = model(x, graph, batch.users, batch.videos, batch.watched)
    expected, _ = loss_fn(out, batch.watched, model.regularized_parameters())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert stats["n"].item() == 40
    assert "clip_features" not in task.state_dict()  # features never go into checkpoints


def test_loss_decreases_with_adam(task_setup) -> None:
    model, x, graph, batch = task_setup
    task = FRAMETrainTask(model, HybridLoss(), x, graph)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss, _ = task(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.65 * losses[0]


def test_unweighted_pointwise_loss_is_the_survival_likelihood() -> None:
    """Without position weights, eq. 14's terms of a view are -log P(where it stopped) under
    the survival aggregation: a full watch costs -log sigmoid(video logit) exactly."""
    out, watched = _output()
    loss, stats = HybridLoss(1.0, 0.0, 0.0, position_weights=False)(out, watched)
    y = CLIP_SCORES
    by_hand = (-(log_sig(y[0][0]) + log_sig(y[0][1]) + log_one_minus_sig(y[0][2]))
               - sum(log_sig(s) for s in y[1]) - log_one_minus_sig(y[2][0]))
    assert loss.item() == pytest.approx(by_hand / 3, rel=1e-6)
    model = FRAME(n_clip_features=4, dim=4, hidden=4, aggregation="survival")
    full_logit = model.video_logit(torch.tensor(y[1]))
    full_only, _ = HybridLoss(1.0, 0.0, 0.0, position_weights=False)(
        FrameOutput(torch.tensor([y[1]]), torch.zeros(1)), torch.tensor([4]))
    assert full_only.item() == pytest.approx(
        -torch.nn.functional.logsigmoid(full_logit).item(), rel=1e-5)
