"""Precomputed user-side sums of frozen clip features (FrozenClipInputs) give the same model.

The dense path applies the FC to all C clips and sums them over each user's edges; the frozen
path applies it to R~ X (M x F) with the bias scaled by R~ 1, and to the batch's clips only.
Forward, loss and every parameter's gradient agree within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frame_dist.graph.clip_graph import build_graph, to_torch
from frame_dist.model.clip_inputs import FrozenClipInputs, streamed_user_sums
from frame_dist.model.frame import FRAME
from frame_dist.model.loss import HybridLoss

M, N, N_C, F, D, H = 9, 7, 4, 12, 6, 10

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    n = 50
    u, v = rng.integers(0, M - 1, n), rng.integers(0, N, n)  # user M-1 has no edges
    r = np.round(rng.random(n), 2)
    full = r > 0.6
    g = build_graph(u, v, r, full, n_users=M, n_videos=N, n_clips=N_C)
    x = torch.from_numpy(rng.normal(size=(N * N_C, F)).astype(np.float32))
    return dict(pg=to_torch(g), x=x, users=torch.tensor([0, 3, 3, M - 1, 5, 1, 7]),
                videos=torch.tensor([2, 2, 6, 0, 2, 4, 5]),
                watched=torch.tensor([0, 1, 4, 2, 2, 3, 4]))


def _model(use_negative=True, enhance=True, aggregation="mean", **kwargs) -> FRAME:
    torch.manual_seed(1)
    model = FRAME(F, dim=D, hidden=H, a_neg=0.3, use_negative=use_negative, enhance=enhance,
                  aggregation=aggregation, **kwargs)
    with torch.no_grad():  # non-zero biases: the R~ 1 term matters
        model.input_proj.bias.copy_(torch.linspace(-0.5, 0.7, D))
    return model


def _loss_and_grads(model, inputs, data):
    out = model(inputs, data["pg"], data["users"], data["videos"], data["watched"])
    loss, _ = HybridLoss(alpha=1.0, beta=0.5, l2=1e-3)(out, data["watched"],
                                                       model.regularized_parameters())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return out, loss, dict(zip([n for n, _ in model.named_parameters()], grads))


@pytest.mark.parametrize("use_negative,enhance,aggregation", [
    (True, True, "mean"), (True, True, "survival"), (False, True, "survival"),
    (True, False, "mean")])
def test_forward_loss_and_gradients_equal_the_dense_path(data, use_negative, enhance,
                                                         aggregation) -> None:
    model = _model(use_negative, enhance, aggregation)
    inputs = FrozenClipInputs.build(data["x"], data["pg"], chunk_rows=4)  # 3 row blocks
    dense_out, dense_loss, dense_grads = _loss_and_grads(model, data["x"], data)
    out, loss, grads = _loss_and_grads(model, inputs, data)
    torch.testing.assert_close(out.clip_scores, dense_out.clip_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.watched_scores, dense_out.watched_scores, atol=1e-5,
                               rtol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(dense_loss.detach()), abs=1e-5, rel=1e-5)
    assert set(grads) == set(dense_grads)
    for name, grad in dense_grads.items():
        assert grad.abs().sum() > 0, name  # every weight is reached, the FC's bias included
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_whole_embeddings_and_pair_scores_equal_the_dense_path(data) -> None:
    model = _model()
    inputs = FrozenClipInputs.build(data["x"], data["pg"])
    for a, b in zip(model.embeddings(inputs, data["pg"]), model.embeddings(data["x"],
                                                                           data["pg"])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        model.score_pairs(inputs, data["pg"], data["users"], data["videos"], batch_size=2),
        model.score_pairs(data["x"], data["pg"], data["users"], data["videos"]),
        atol=1e-5, rtol=1e-5)


def test_user_sums_by_hand(data) -> None:
    inputs = FrozenClipInputs.build(data["x"], data["pg"], chunk_rows=2)
    dense = data["pg"].pos.matrix.to_dense()
    torch.testing.assert_close(inputs.pos_sums, dense @ data["x"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inputs.pos_degree, dense.sum(1, keepdim=True))
    assert float(inputs.pos_degree[M - 1]) == 0.0  # the user without edges
    assert inputs.state_dict() == {}  # constants: never in a checkpoint


def test_refused_where_the_clip_input_is_learned(data) -> None:
    inputs = FrozenClipInputs.build(data["x"], data["pg"])
    table = _model(trainable_clip_features=True, n_clips_total=N * N_C)
    with pytest.raises(ValueError, match="needs frozen visual features"):
        table.embeddings(inputs, data["pg"])
    with pytest.raises(ValueError, match=r"features \(5, 12\) must be \(C, F\) with C = 28"):
        FrozenClipInputs.build(data["x"][:5], data["pg"])
    no_negative = FrozenClipInputs.build(data["x"], type(data["pg"])(data["pg"].pos, None, N_C))
    with pytest.raises(ValueError, match="needs a graph with the negative adjacency"):
        _model().embeddings(no_negative, type(data["pg"])(data["pg"].pos, None, N_C))


def test_streamed_sums_equal_the_direct_ones(data) -> None:
    """R~ X from blocks of clips in any order (one stored part at a time) equals R~ X."""
    direct = FrozenClipInputs.build(data["x"], data["pg"])
    order = torch.from_numpy(np.random.default_rng(0).permutation(N * N_C))
    blocks = [(order[k:k + 5], data["x"][order[k:k + 5]]) for k in range(0, N * N_C, 5)]
    (pos, pos_degree), (neg, neg_degree) = streamed_user_sums(data["pg"], iter(blocks), F)
    torch.testing.assert_close(pos, direct.pos_sums, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(neg, direct.neg_sums, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pos_degree, direct.pos_degree)
    torch.testing.assert_close(neg_degree, direct.neg_degree)
