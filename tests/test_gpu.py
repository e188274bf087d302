"""The CUDA paths: skipped without a CUDA device, run where one is (``pytest -m gpu``).

Each test computes the same thing on the CPU in float32 and on the GPU as the job runs it there
(bf16 autocast for the encoder and for training, float32 for scoring) and compares:

- the frame encoder (channels-last, bf16 autocast) against the CPU trunk;
- the fused scoring kernel and its running top-K on the GPU against the CPU kernel;
- FRAME's forward and backward on CUDA under bf16 autocast against fp32 on the CPU, including
  the sparse products (kept fp32) and the gradient of every parameter;
- a short single-process training run on CUDA (precision auto = bf16) against the CPU's;
- Ray Train + DeepSpeed with one GPU worker (NCCL, bf16) on the tiny world (``tiny_world``,
  tests/conftest.py) in one graph shard: it trains, writes model.pt, and its test AUC is that
  of a CPU run within the bf16 tolerance;
- the score job with GPU actors (chosen because the cluster has a GPU) against the model's own
  forward on the CPU.

W = 2 over NCCL needs two GPUs and is not covered here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from worlds import (  # tests/ is on sys.path (pytest)
    assert_same_lists,
    copy_store,
    fresh_copy,
    naive_top_k,
    top_k_lists,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


def test_encoder_on_cuda_matches_cpu() -> None:
    from frame_dist.extract.encoder import FrameEncoder, build_resnet50_trunk

    frames = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    cpu = FrameEncoder(build_resnet50_trunk("random", seed=3)).eval()
    gpu = FrameEncoder(build_resnet50_trunk("random", seed=3)).eval().to(CUDA)
    expected = cpu.encode(frames, batch_size=4).astype(np.float32)  # (6, 2048) fp32 on CPU
    got = gpu.encode(frames, batch_size=4).astype(np.float32)  # bf16 autocast on CUDA
    assert got.shape == (6, 2048) and np.isfinite(got).all()
    cos = (got * expected).sum(1) / (np.linalg.norm(got, axis=1)
                                     * np.linalg.norm(expected, axis=1))
    assert cos.min() > 0.99, cos
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.05


@pytest.mark.parametrize("aggregation", ["mean", "survival"])
def test_fused_scorer_on_cuda_matches_cpu(aggregation) -> None:
    from frame_dist.score.kernel import FusedScorer

    g = torch.Generator().manual_seed(0)
    t_c = torch.randn(300, 4, 64, generator=g)  # (V, N_c, G)
    w = torch.randn(64, generator=g)
    z_u = torch.randn(257, 64, generator=g)  # a partial last tile
    seen = (torch.tensor([0, 0, 256]), torch.tensor([3, 299, 0]))
    cpu = FusedScorer(t_c, w, 0.5, aggregation=aggregation, videos_per_block=128)
    gpu = FusedScorer(t_c, w, 0.5, aggregation=aggregation, device="cuda",
                      videos_per_block=128)
    torch.testing.assert_close(gpu.scores(z_u).cpu(), cpu.scores(z_u), atol=1e-3, rtol=1e-5)
    values_c, positions_c = cpu.top_k(z_u, 10, seen)
    values_g, positions_g = gpu.top_k(z_u, 10, seen)
    torch.testing.assert_close(values_g.cpu(), values_c, atol=1e-3, rtol=1e-5)
    assert (positions_g.cpu() == positions_c).float().mean() > 0.99  # near-ties may swap
    assert not torch.isin(positions_g[0].cpu(), torch.tensor([3, 299])).any()


def _tiny_model_and_graph():
    """A FRAME with non-zero biases, a 40-user x 25-video graph (N_c = 4), features, a batch."""
    from frame_dist.graph.clip_graph import build_graph, to_torch
    from frame_dist.model.frame import FRAME

    rng = np.random.default_rng(0)
    n, m, n_videos, n_c, f = 400, 40, 25, 4, 32
    u, v = rng.integers(0, m, n), rng.integers(0, n_videos, n)
    r = np.round(rng.random(n), 2)
    g = build_graph(u, v, r, r > 0.7, n_users=m, n_videos=n_videos, n_clips=n_c)
    x = torch.from_numpy(rng.normal(size=(n_videos * n_c, f)).astype(np.float32))
    torch.manual_seed(0)
    model = FRAME(f, dim=16, hidden=32, a_pos=1.0, a_neg=0.3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.linspace(-0.3, 0.4, p.numel()))
    batch = (torch.from_numpy(u[:64]), torch.from_numpy(v[:64]),
             torch.from_numpy(np.minimum((r[:64] * n_c).astype(np.int64), n_c)))
    return model, to_torch(g), x, batch


def test_model_forward_backward_bf16_on_cuda_matches_fp32_cpu() -> None:
    from frame_dist.model.frame import FRAME
    from frame_dist.model.loss import HybridLoss
    from frame_dist.train.trainer import autocast_for

    model_cpu, graph, x, (users, videos, watched) = _tiny_model_and_graph()
    model_gpu = FRAME(**model_cpu.model_args()).to(CUDA)
    model_gpu.load_state_dict(model_cpu.state_dict())
    loss_fn = HybridLoss(1.0, 0.5, 1e-5)

    def step(model, device, precision):
        model.zero_grad()
        with autocast_for(device, precision):
            out = model(x.to(device), graph.to(device), users.to(device), videos.to(device),
                        watched.to(device))
        loss, _ = loss_fn(out, watched.to(device), model.regularized_parameters())
        loss.backward()
        return out, loss

    out_c, loss_c = step(model_cpu, "cpu", "fp32")
    out_g, loss_g = step(model_gpu, CUDA, "bf16")
    torch.testing.assert_close(out_g.clip_scores.float().cpu(), out_c.clip_scores,
                               atol=5e-2, rtol=5e-2)
    assert float(loss_g) == pytest.approx(float(loss_c), rel=2e-2)
    for (name, p_c), p_g in zip(model_cpu.named_parameters(), model_gpu.parameters()):
        assert p_g.grad is not None and torch.isfinite(p_g.grad).all(), name
        assert p_g.grad.dtype == torch.float32, name  # weights and gradients stay fp32
        cos = torch.nn.functional.cosine_similarity(p_g.grad.cpu().flatten(),
                                                    p_c.grad.flatten(), dim=0)
        assert p_c.grad.abs().max() == 0 or cos > 0.98, (name, float(cos))


def test_single_process_training_on_cuda_matches_cpu() -> None:
    from frame_dist.config import TrainConfig
    from frame_dist.model.frame import FRAME
    from frame_dist.train.trainer import EvalData, TrainData, train

    model_cpu, graph, x, _ = _tiny_model_and_graph()
    rng = np.random.default_rng(2)
    data = TrainData(rng.integers(0, 40, 300), rng.integers(0, 25, 300),
                     rng.integers(0, 5, 300))
    valid = EvalData(rng.integers(0, 40, 60), rng.integers(0, 25, 60),
                     np.tile([0, 1], 30).astype(np.int64))
    model_gpu = FRAME(**model_cpu.model_args())
    model_gpu.load_state_dict(model_cpu.state_dict())
    cfg = TrainConfig(epochs=3, batch_size=64, patience=10, seed=0)
    on_cpu = train(model_cpu, x, graph, data, valid, cfg, device="cpu")
    on_gpu = train(model_gpu, x, graph, data, valid, cfg, device="cuda")  # precision auto: bf16
    assert next(model_gpu.parameters()).device.type == "cuda"
    assert len(on_gpu.history) == len(on_cpu.history) == 3
    for c, g in zip(on_cpu.history, on_gpu.history):
        assert g["loss"] == pytest.approx(c["loss"], rel=5e-2)


@pytest.mark.slow
def test_ray_train_one_gpu_worker(ray_local, tiny_world, tmp_path) -> None:
    from frame_dist.config import load_config
    from frame_dist.graph.shards import build_shards
    from frame_dist.train.artifacts import run_path
    from frame_dist.train.ray_loop import run_training

    _, world_store, world_overrides = tiny_world
    cfg, store, overrides = copy_store(world_store, world_overrides, tmp_path / "store",
                                       "graph.n_shards=1", "train.workers=1")
    build_shards(cfg, store)  # the graph again, in one shard
    gpu = run_training(load_config(None, [*overrides, "train.use_gpu=true",
                                          "train.run_name=gpu"]), store)
    cpu = run_training(load_config(None, [*overrides, "train.use_gpu=false",
                                          "train.run_name=cpu"]), store)
    assert gpu["epochs_run"] == cpu["epochs_run"] == 3
    for g, c in zip(gpu["history"], cpu["history"]):
        assert g["loss"] == pytest.approx(c["loss"], rel=5e-2)
    assert gpu["test"]["auc"] == pytest.approx(cpu["test"]["auc"], abs=0.1)
    saved = torch.load(store.path(run_path("gpu", "model.pt")), map_location="cpu",
                       weights_only=True)
    assert all(v.device.type == "cpu" for v in saved["state_dict"].values())


@pytest.mark.slow
def test_score_job_uses_gpu_actors(score_world, score_reference, ray_local, tmp_path) -> None:
    """Default settings on a cluster with GPUs: one GPU actor per GPU; the lists of the CPU
    forward."""
    from frame_dist.score.pipeline import read_scores, run_scoring

    gpus = int(ray_local.cluster_resources().get("GPU", 0))
    assert gpus >= 1
    cfg, store, _ = fresh_copy(score_world, tmp_path)
    summary = run_scoring(cfg, store)
    assert summary.actors == min(gpus, summary.chunks) and summary.kernel == "eager"
    assert_same_lists(top_k_lists(read_scores(store)), naive_top_k(score_reference, 3, True))
