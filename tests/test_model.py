"""FRAME forward against a dense reference, gradients, restricted/full parity, propagation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from frame_dist.graph.clip_graph import build_graph, clip_labels, slice_users, to_torch
from frame_dist.model.frame import FRAME, PreferenceMLP
from frame_dist.model.propagation import (
    LocalPropagation,
    csr_gather_rows,
    csr_tensor,
    csr_transpose,
    sparse_matmul,
)

M, N, N_C, F, D, H = 9, 7, 3, 6, 5, 8
OPTIONS = list(itertools.product([True, False], repeat=3))  # use_negative, enhance, use_visual


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = 60
    u, v = rng.integers(0, M - 1, n), rng.integers(0, N, n)  # user M-1 has no edges
    r = np.round(rng.random(n), 2)
    full = r > 0.7
    g = build_graph(u, v, r, full, n_users=M, n_videos=N, n_clips=N_C)
    x = torch.from_numpy(rng.normal(size=(N * N_C, F)).astype(np.float32))
    users = torch.tensor([0, 3, 3, M - 1, 5, 1])
    videos = torch.tensor([2, 2, 6, 0, 2, 4])
    watched = torch.tensor([0, 1, 3, 2, 2, 3])
    return dict(graph=g, pg=to_torch(g), x=x, users=users, videos=videos, watched=watched)


def make_model(use_negative: bool, enhance: bool, use_visual: bool, seed: int = 0,
               aggregation: str = "mean") -> FRAME:
    torch.manual_seed(seed)
    model = FRAME(F, dim=D, hidden=H, a_pos=1.0, a_neg=0.3, use_negative=use_negative,
                  enhance=enhance, use_visual=use_visual, n_clips_total=N * N_C,
                  aggregation=aggregation)
    with torch.no_grad():  # non-trivial biases and alphas so every term matters
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.linspace(-0.3, 0.4, p.numel()))
    return model


def dense_reference(model: FRAME, x: torch.Tensor, graph, users, videos, watched):
    """Eqs. 7-13 and the watched-mean score with dense float64 matrices and explicit concat."""
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    rp = torch.from_numpy(graph.pos_norm.toarray()).double()
    rn = torch.from_numpy(graph.neg_norm.toarray()).double()
    if model.use_visual:
        f = x.double() @ p["input_proj.weight"].T + p["input_proj.bias"]
    else:
        f = p["clip_table.weight"]
    e = f @ p["enhancement.weight"].T if model.enhance else f  # H_c^(0)
    hup = torch.relu(rp @ e @ p["w_pos_1.weight"].T)
    hcp = torch.relu(rp.T @ hup @ p["w_pos_2.weight"].T)
    if model.use_negative:
        hun = torch.relu(rn @ e @ p["w_neg_1.weight"].T)
        hcn = torch.relu(rn.T @ hun @ p["w_neg_2.weight"].T)
        hc1 = (hcp + hcn) / 2
    else:
        hc1 = hcp
    hc = p["layer_weights"][0] * e + p["layer_weights"][1] * hc1

    def mlp(prefix, hu, hcl):
        z = torch.cat([hu, hcl], -1) @ p[f"{prefix}.hidden.weight"].T + p[f"{prefix}.hidden.bias"]
        return (torch.relu(z) @ p[f"{prefix}.out.weight"].T + p[f"{prefix}.out.bias"])[..., 0]

    def score(u_idx, hcl):
        y = model.a_pos * mlp("mlp_pos", hup[u_idx], hcl)
        if model.use_negative:
            y = y - model.a_neg * mlp("mlp_neg", hun[u_idx], hcl)
        return y

    clip_ids = videos[:, None] * N_C + torch.arange(N_C)  # (B, N_c)
    clip_scores = torch.stack([score(users, hc[clip_ids[:, j]]) for j in range(N_C)], 1)
    watched_scores = []
    for b in range(len(users)):
        w = int(watched[b])
        mean = hc[clip_ids[b, :max(w, 1)]].mean(0) if w > 0 else torch.zeros(D).double()
        watched_scores.append(score(users[b:b + 1], mean[None])[0])
    return hc, hup, clip_scores, torch.stack(watched_scores)


@pytest.mark.parametrize("use_negative,enhance,use_visual", OPTIONS)
def test_forward_matches_dense_reference(data, use_negative, enhance, use_visual) -> None:
    model = make_model(use_negative, enhance, use_visual)
    x = data["x"] if use_visual else None
    pg = data["pg"] if use_negative else to_torch(data["graph"], with_negative=False)
    hc_ref, hup_ref, clip_ref, watched_ref = dense_reference(
        model, data["x"], data["graph"], data["users"], data["videos"], data["watched"])

    h_c, h_u_pos, h_u_neg = model.embeddings(x, pg)
    assert h_c.shape == (N * N_C, D) and h_u_pos.shape == (M, D)
    assert (h_u_neg is None) == (not use_negative)
    torch.testing.assert_close(h_c.double(), hc_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_u_pos.double(), hup_ref, atol=1e-5, rtol=1e-5)
    assert h_u_pos[M - 1].abs().sum() == 0  # a user without edges has a zero interest

    out = model(x, pg, data["users"], data["videos"], data["watched"])
    torch.testing.assert_close(out.clip_scores.double(), clip_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.watched_scores.double(), watched_ref, atol=1e-5, rtol=1e-5)

    video_ref = clip_ref.mean(1)  # eq. 13
    pairs = model.score_pairs(x, pg, data["users"], data["videos"])
    torch.testing.assert_close(pairs.double(), video_ref, atol=1e-5, rtol=1e-5)
    assert len(data["users"]) > 3  # batches of 3 pairs: several, the last one partial
    batched = model.score_pairs(x, pg, data["users"], data["videos"], batch_size=3)
    torch.testing.assert_close(batched, pairs, atol=1e-6, rtol=0)
    full = model.video_scores(data["users"], data["videos"], h_c, h_u_pos, h_u_neg, N_C)
    torch.testing.assert_close(full.double(), video_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_negative,enhance,use_visual", OPTIONS)
def test_gradients_reach_every_parameter(data, use_negative, enhance, use_visual) -> None:
    model = make_model(use_negative, enhance, use_visual)
    x = data["x"] if use_visual else None
    out = model(x, data["pg"], data["users"], data["videos"], data["watched"])
    (out.clip_scores.sum() + out.watched_scores.sum()).backward()
    names = {n for n, _ in model.named_parameters()}
    assert ("mlp_neg.hidden.weight" in names) == use_negative
    assert ("enhancement.weight" in names) == enhance
    assert ("clip_table.weight" in names) == (not use_visual)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("use_negative", [True, False])
def test_restricted_clip_side_equals_full_in_value_and_gradient(data, use_negative) -> None:
    """forward() propagates to the batch's clips only; the full computation gives the same."""
    model = make_model(use_negative, True, True)
    users, videos, watched = data["users"], data["videos"], data["watched"]
    out = model(data["x"], data["pg"], users, videos, watched)
    loss_restricted = (out.clip_scores ** 2).sum() + out.watched_scores.sum()
    grads_restricted = torch.autograd.grad(loss_restricted, list(model.parameters()))

    h_c, h_u_pos, h_u_neg = model.embeddings(data["x"], data["pg"])  # all C clips
    h_pair = h_c.view(N, N_C, D)[videos]
    hn = None if h_u_neg is None else h_u_neg[users, None]
    clip_scores = model.clip_scores(h_u_pos[users, None], hn, h_pair)
    played = (torch.arange(N_C)[None] < watched[:, None]).float()
    mean = (played[..., None] * h_pair).sum(1) / played.sum(1, keepdim=True).clamp(min=1)
    watched_scores = model.clip_scores(h_u_pos[users], None if hn is None else hn[:, 0], mean)
    torch.testing.assert_close(out.clip_scores, clip_scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.watched_scores, watched_scores, atol=1e-6, rtol=1e-5)
    loss_full = (clip_scores ** 2).sum() + watched_scores.sum()
    grads_full = torch.autograd.grad(loss_full, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads_restricted, grads_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_model_args_rebuild_identical_model(data) -> None:
    model = make_model(True, True, True)
    clone = FRAME(**model.model_args())
    clone.load_state_dict(model.state_dict())
    args = (data["x"], data["pg"], data["users"], data["videos"])
    torch.testing.assert_close(clone.score_pairs(*args), model.score_pairs(*args))
    assert model.model_args() == dict(n_clip_features=F, dim=D, hidden=H, a_pos=1.0, a_neg=0.3,
                                      use_negative=True, enhance=True, use_visual=True,
                                      n_clips_total=N * N_C, trainable_clip_features=False,
                                      aggregation="mean")


def test_trainable_clip_features_start_equal_and_learn(data) -> None:
    """The table starts as the extracted features (same scores), gets gradients, skips L2."""
    fixed = make_model(True, True, True)
    torch.manual_seed(0)
    model = FRAME(F, dim=D, hidden=H, a_pos=1.0, a_neg=0.3, n_clips_total=N * N_C,
                  trainable_clip_features=True)
    model.load_state_dict(fixed.state_dict(), strict=False)
    model.init_clip_features(data["x"])
    args = (data["pg"], data["users"], data["videos"])
    torch.testing.assert_close(model.score_pairs(None, *args), fixed.score_pairs(data["x"], *args))
    # the table replaces the features passed in
    torch.testing.assert_close(model.score_pairs(data["x"] * 0, *args),
                               fixed.score_pairs(data["x"], *args))
    out = model(None, data["pg"], data["users"], data["videos"], data["watched"])
    out.clip_scores.sum().backward()
    grad = model.clip_feature_table.weight.grad
    touched = torch.unique((data["pg"].pos.matrix.to_dense() != 0).nonzero()[:, 1])
    assert grad[touched].abs().sum() > 0
    reg = {id(p) for p in model.regularized_parameters()}
    assert id(model.clip_feature_table.weight) not in reg
    rebuilt = FRAME(**model.model_args())
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.score_pairs(None, *args), model.score_pairs(None, *args))
    with pytest.raises(ValueError, match=r"init_clip_features: got \(3, 6\)"):
        model.init_clip_features(data["x"][:3])
    with pytest.raises(ValueError, match="trainable_clip_features=True needs use_visual"):
        FRAME(F, use_visual=False, n_clips_total=4, trainable_clip_features=True)


@pytest.mark.parametrize("trainable", [False, True])
def test_local_clip_axis_reads_the_global_table(data, trainable) -> None:
    """A worker's graph over a subset of videos (local clip axis + clip_ids) gives the same user
    embeddings as the whole graph when its users' clips are all in the subset."""
    from frame_dist.graph.clip_graph import adjacency
    from frame_dist.model.propagation import PropagationGraph

    torch.manual_seed(2)
    model = FRAME(F, dim=D, hidden=H, use_visual=trainable, n_clips_total=N * N_C,
                  trainable_clip_features=trainable)
    if trainable:
        model.init_clip_features(data["x"])
    g = data["graph"]
    users = np.arange(3)
    sub = g.pos_norm[users] + g.neg_norm[users]
    videos = np.unique(sub.nonzero()[1] // N_C)
    cols = (videos[:, None] * N_C + np.arange(N_C)).reshape(-1)
    local = PropagationGraph(adjacency(g.pos_norm[users][:, cols]),
                             adjacency(g.neg_norm[users][:, cols]), N_C,
                             clip_ids=torch.from_numpy(cols))
    _, hp_local, hn_local = model.embeddings(None, local)
    _, hp, hn = model.embeddings(None, data["pg"])
    torch.testing.assert_close(hp_local, hp[:3], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hn_local, hn[:3], atol=1e-6, rtol=1e-5)


def test_xavier_init_and_regularized_parameters() -> None:
    torch.manual_seed(0)
    model = FRAME(2048, dim=128, hidden=256)
    bound = (6.0 / (2048 + 128)) ** 0.5
    w = model.input_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.input_proj.bias.abs().sum() == 0
    assert model.layer_weights.tolist() == [0.5, 0.5]
    reg = {id(p) for p in model.regularized_parameters()}
    named = dict(model.named_parameters())
    assert id(named["w_pos_1.weight"]) in reg and id(named["input_proj.bias"]) not in reg
    assert id(named["layer_weights"]) not in reg
    assert len(reg) == 10  # fc, W_t, W_p1, W_p2, W_n1, W_n2, 2 x MLP (2 weights each)


def test_score_block_matches_pairs(data) -> None:
    model = make_model(True, True, True)
    h_c, h_u_pos, h_u_neg = model.embeddings(data["x"], data["pg"])
    block = model.score_block(h_u_pos[:4], h_u_neg[:4], h_c.view(N, N_C, D))  # (4, N)
    uu, vv = torch.meshgrid(torch.arange(4), torch.arange(N), indexing="ij")
    pairs = model.video_scores(uu.reshape(-1), vv.reshape(-1), h_c, h_u_pos, h_u_neg, N_C)
    torch.testing.assert_close(block, pairs.view(4, N), atol=1e-6, rtol=1e-5)
    exclude = torch.zeros(4, N, dtype=torch.bool)
    exclude[0, block[0].argmax()] = True
    top_scores, top_videos = model.recommend(h_u_pos[:4], h_u_neg[:4], h_c.view(N, N_C, D), 3,
                                             exclude)
    expected = torch.topk(block.masked_fill(exclude, float("-inf")), 3, dim=1)
    assert torch.equal(top_videos, expected.indices)
    assert block[0].argmax() not in top_videos[0]


@pytest.mark.parametrize("aggregation", ["mean", "survival"])
@pytest.mark.parametrize("use_negative", [True, False])
def test_fused_verbs_reproduce_pair_scores(data, use_negative, aggregation) -> None:
    """From the model's fused tables, mean: sum_j w^T ReLU(Z_u - T_{v,j}) + beta; survival:
    video_logit of y_j = w^T ReLU(Z_u - T_{v,j}) + beta; either = its pair scores."""
    model = make_model(use_negative, True, True, aggregation=aggregation)
    pg = data["pg"] if use_negative else to_torch(data["graph"], with_negative=False)
    users, videos = data["users"], data["videos"]
    some = torch.tensor([4, 0, 2])
    with torch.no_grad():
        h_c, h_u_pos, h_u_neg = model.embeddings(data["x"], pg)
        z_u = model.fused_user_table(h_u_pos, h_u_neg)  # (M, G)
        t_c, w, beta, agg = model.fused_clip_side(h_c, N_C)  # (N, N_c, G), (G,), float, str
        t_some, w_some, beta_some, _ = model.fused_clip_side(h_c, N_C, some)
        pairs = model.score_pairs(data["x"], pg, users, videos)  # (B,)
        full = model.video_scores(users, videos, h_c, h_u_pos, h_u_neg, N_C)  # (B,)
        block = model.score_block(h_u_pos, h_u_neg, h_c.view(N, N_C, D))  # (M, N)
    g = H * (2 if use_negative else 1)
    assert z_u.shape == (M, g) and t_c.shape == (N, N_C, g) and w.shape == (g,)
    assert isinstance(beta, float) and beta != 0.0  # the output biases are non-zero here
    assert agg == aggregation

    def video(clip_terms: torch.Tensor) -> torch.Tensor:  # (..., N_c) w^T ReLU terms -> (...)
        if agg == "mean":  # 1 / N_c is in w
            return clip_terms.sum(-1) + beta
        return model.video_logit(clip_terms + beta)  # w per clip: y_j, then P = prod sigmoid

    fused = video(torch.relu(z_u[users, None] - t_c[videos]) @ w)  # (B,)
    torch.testing.assert_close(fused, pairs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, full, atol=1e-5, rtol=0)
    every = video(torch.relu(z_u[:, None, None] - t_c[None]) @ w)  # (M, N)
    torch.testing.assert_close(every, block, atol=1e-5, rtol=0)
    assert torch.equal(z_u[M - 1], torch.zeros(g))  # a user without edges: Z_u = 0
    torch.testing.assert_close(t_some, t_c[some], atol=1e-5, rtol=0)  # a subset of videos
    assert torch.equal(w_some, w) and beta_some == beta
    if use_negative:
        with pytest.raises(ValueError, match="h_u_neg is None"):
            model.fused_user_table(h_u_pos, None)


def test_preference_mlp_equals_concatenation() -> None:
    torch.manual_seed(1)
    mlp = PreferenceMLP(4, 6)
    hu, hc = torch.randn(3, 1, 4), torch.randn(3, 5, 4)
    ref = mlp.out(torch.relu(mlp.hidden(torch.cat([hu.expand(3, 5, 4), hc], -1)))).squeeze(-1)
    torch.testing.assert_close(mlp(hu, hc), ref)


def test_bad_arguments_raise_clearly(data) -> None:
    with pytest.raises(ValueError, match="use_visual=False needs n_clips_total"):
        FRAME(F, use_visual=False)
    model = make_model(True, True, True)
    with pytest.raises(ValueError, match=r"clip_features must be \(C, 6\), got \(21, 5\)"):
        model.embeddings(data["x"][:, :5], data["pg"])
    with pytest.raises(IndexError, match=r"videos \[7\] out of range \[0, 7\) of the graph"):
        model.score_pairs(data["x"], data["pg"], torch.tensor([0, 1]), torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="needs a graph with the negative adjacency"):
        model.embeddings(data["x"], to_torch(data["graph"], with_negative=False))
    with pytest.raises(ValueError, match=r"H_c\^\(0\) has 20 rows, the graph has 21 clips"):
        model.propagate(torch.zeros(20, D), data["pg"])


# --------------------------------------------------------------------------- propagation


def _random_csr(rows: int, cols: int, density: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = (rng.random((rows, cols)) < density) * rng.normal(size=(rows, cols))
    dense = dense.astype(np.float32)
    t = torch.from_numpy(dense).to_sparse_csr()
    return csr_tensor(t.crow_indices(), t.col_indices(), t.values(), (rows, cols)), dense


def test_csr_gather_rows_and_transpose() -> None:
    csr, dense = _random_csr(6, 5, 0.4, 0)
    rows = torch.tensor([4, 0, 4, 5])
    gathered = csr_gather_rows(csr, rows).to_dense().numpy()
    np.testing.assert_array_equal(gathered, dense[[4, 0, 4, 5]])
    assert csr_gather_rows(csr, torch.tensor([], dtype=torch.long)).shape == (0, 5)
    np.testing.assert_array_equal(csr_transpose(csr).to_dense().numpy(), dense.T)
    # the backward of a restricted clip side: gathered rows (repeats allowed), transposed
    np.testing.assert_array_equal(csr_transpose(csr_gather_rows(csr, rows)).to_dense().numpy(),
                                  dense[[4, 0, 4, 5]].T)
    assert csr_transpose(csr_gather_rows(csr, torch.tensor([], dtype=torch.long))).shape == (5, 0)


@pytest.mark.parametrize("transpose", ["given", "callable", "sorted"])
def test_sparse_matmul_gradient_matches_dense(transpose: str) -> None:
    csr, dense = _random_csr(7, 4, 0.5, 1)
    x = torch.randn(4, 3, requires_grad=True)
    given = {"given": csr_transpose(csr), "callable": lambda: csr_transpose(csr),
             "sorted": None}[transpose]
    y = sparse_matmul(csr, x, given)
    g = torch.randn(7, 3)
    (y * g).sum().backward()
    torch.testing.assert_close(y, torch.from_numpy(dense) @ x)
    torch.testing.assert_close(x.grad, torch.from_numpy(dense).T @ g)
    with pytest.raises(TypeError, match="matrix is torch.float32 but x is torch.float64"):
        sparse_matmul(csr, x.double())


@pytest.mark.parametrize("clips", [None, [5, 0, 17, 9], [5, 0, 5, 9]])
def test_local_propagation_values_and_gradients(data, clips) -> None:
    adj = data["pg"].pos
    dense = torch.from_numpy(data["graph"].pos_norm.toarray())
    prop = LocalPropagation()
    x_c = torch.randn(N * N_C, 4, requires_grad=True)
    x_u = torch.randn(M, 4, requires_grad=True)
    idx = None if clips is None else torch.tensor(clips)
    users = prop.users_from_clips(adj, x_c)
    clip_rows = prop.clips_from_users(adj, x_u, idx)
    ref_users = dense @ x_c
    ref_clips = dense.T @ x_u if idx is None else (dense.T @ x_u)[idx]
    torch.testing.assert_close(users, ref_users)
    torch.testing.assert_close(clip_rows, ref_clips)
    g_u, g_c = torch.randn_like(users), torch.randn_like(clip_rows)
    grads = torch.autograd.grad((users * g_u).sum() + (clip_rows * g_c).sum(), [x_c, x_u])
    ref = torch.autograd.grad((ref_users * g_u).sum() + (ref_clips * g_c).sum(), [x_c, x_u])
    torch.testing.assert_close(grads[0], ref[0])
    torch.testing.assert_close(grads[1], ref[1])
    with pytest.raises(ValueError, match=r"x has 3 rows, the graph has 9 users"):
        prop.clips_from_users(adj, x_u[:3])


def test_empty_graph_propagates_zeros() -> None:
    g = build_graph(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool),
                    n_users=3, n_videos=2, n_clips=2)
    model = FRAME(F, dim=D, hidden=H)
    x = torch.randn(4, F)
    h_c, h_u_pos, h_u_neg = model.embeddings(x, to_torch(g))
    assert h_u_pos.abs().sum() == 0 and h_u_neg.abs().sum() == 0
    torch.testing.assert_close(h_c, 0.5 * model.clip_input(x))  # H_c = alpha_0 H_c^(0)


class ShardSumPropagation(LocalPropagation):
    """Two user shards in one process: the clip side adds the other shard's partial product.

    This is the override point a distributed propagation uses (there, an autograd-aware
    all-reduce over workers replaces the explicit sum over the other shard's rows).
    """

    def __init__(self, mine, other, other_users):
        self.side = {id(mine.pos): "pos", id(mine.neg): "neg"}
        self.other, self.other_users = other, other_users

    def clips_from_users(self, adj, x_users, clips=None):
        side = self.side[id(adj)]
        return (super().clips_from_users(adj, x_users, clips)
                + super().clips_from_users(getattr(self.other, side), self.other_users[side],
                                           clips))


def test_partitioned_users_give_the_same_scores(data) -> None:
    """Propagating on a user shard plus the other shard's partial sums equals the whole graph."""
    model = make_model(True, True, True)
    g = data["graph"]
    shard_a = to_torch(slice_users(g, np.arange(0, 4)))
    shard_b = to_torch(slice_users(g, np.arange(4, M)))
    h_c0 = model.clip_input(data["x"])
    local = LocalPropagation()
    h_b = {"pos": torch.relu(model.w_pos_1(local.users_from_clips(shard_b.pos, h_c0))),
           "neg": torch.relu(model.w_neg_1(local.users_from_clips(shard_b.neg, h_c0)))}
    users, videos = torch.tensor([0, 3, 1]), torch.tensor([2, 6, 4])
    # the same weights, built with the shard propagation (a model's propagation is never swapped)
    sharded_model = FRAME(**model.model_args(),
                          propagation=ShardSumPropagation(shard_a, shard_b, h_b))
    sharded_model.load_state_dict(model.state_dict())
    sharded = sharded_model.score_pairs(data["x"], shard_a, users, videos)
    whole = model.score_pairs(data["x"], data["pg"], users, videos)
    torch.testing.assert_close(sharded, whole, atol=1e-6, rtol=1e-5)


def test_clip_labels_drive_watched_mean(data) -> None:
    """watched from graph.clip_labels: a full watch pools all N_c clips, r=0 pools none."""
    watched = torch.from_numpy(clip_labels(np.array([1.0, 0.0]), np.array([True, False]), N_C))
    assert watched.tolist() == [N_C, 0]
    model = make_model(True, True, True)
    out = model(data["x"], data["pg"], torch.tensor([0, 1]), torch.tensor([2, 2]), watched)
    h_c, h_u_pos, h_u_neg = model.embeddings(data["x"], data["pg"])
    mean_all = h_c.view(N, N_C, D)[2].mean(0)
    expected = model.clip_scores(h_u_pos[0], h_u_neg[0], mean_all)
    torch.testing.assert_close(out.watched_scores[0], expected, atol=1e-6, rtol=1e-5)


def test_survival_video_logit_by_hand() -> None:
    """P(full) = prod_j sigmoid(y_j), returned as its logit; "mean" is eq. 13."""
    y = torch.tensor([[2.0, -1.0, 0.5], [30.0, 30.0, 30.0]])
    survival = FRAME(n_clip_features=4, dim=4, hidden=4, aggregation="survival")
    p = torch.sigmoid(y.double()).prod(-1)
    log_p = torch.nn.functional.logsigmoid(y.double()).sum(-1)  # 1 - p exact near p = 1
    expected = log_p - torch.log(-torch.expm1(log_p))
    assert expected[0].item() == pytest.approx(torch.log(p / (1 - p))[0].item(), rel=1e-9)
    assert survival.video_logit(y).double() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(survival.video_logit(torch.full((2, 3), 200.0))).all()
    mean = FRAME(n_clip_features=4, dim=4, hidden=4)
    assert mean.aggregation == "mean"  # the class default is the paper's eq. 13
    assert mean.video_logit(y).tolist() == pytest.approx(y.mean(-1).tolist())
    with pytest.raises(ValueError, match="aggregation='max' must be one of"):
        FRAME(n_clip_features=4, dim=4, aggregation="max")
