"""Quality on the synthetic world: the shape of the paper's ablations where the truth is known.

    .venv/bin/python -m benchmarks.quality                       # medium world, 3 seeds
    .venv/bin/python -m benchmarks.quality --preset small --seeds 1 --batch 256  # smoke run

Runs the real stages for the data (world -> ingest -> extract on Ray Data, into its own store),
builds the graph for every N_c, then trains with the single-process trainer (the distributed
trainer computes the same, tests/test_train_loop.py) and reports test AUC / Logloss / NDCG@5,
mean and spread over seeds, next to the oracle (the simulation's true probabilities):

* FRAME with N_c in {1, 4, 8, 16} (Table 4),
* without negative clips and the pair-wise loss (Table 6),
* raw versus enhanced clip features (Table 5),
* a video-level baseline that sees the same features: user embedding + mean video feature
  through a small MLP, trained with BCE on the full-watch label (no clips, no graph).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from feature_store.store import Store
from frame_dist.config import Config, load_config
from frame_dist.evaluate.evaluation import split_pairs
from frame_dist.graph.shards import build_shards
from frame_dist.model.metrics import all_metrics
from frame_dist.train.loop import torch_step
from frame_dist.train.trainer import EvalData, TrainData, build_model, evaluate, train
from frame_dist.train.worker_data import whole_graph


def prepare(preset: str, root: str, grid: int = 16) -> Config:
    from jobs.extract import extract
    from jobs.ingest import ingest

    cfg = load_config(None, [f"world.preset={preset}", f"world.out_dir={root}/world",
                             f"store.root={root}/store", f"extract.grid_size={grid}",
                             "extract.image_size=64", "extract.weights=random",
                             "extract.batch_size=64"])
    ingest(cfg)
    extract(cfg)
    return cfg


def frame_variant(cfg: Config, store: Store, n_clips: int, seed: int, epochs: int, batch: int,
                  **model_options) -> dict[str, float]:
    run = load_config(None, [f"store.root={cfg.store.root}",
                             f"extract.grid_size={cfg.extract.grid_size}",
                             f"graph.n_clips={n_clips}", f"train.seed={seed}",
                             f"train.epochs={epochs}", "train.patience=3",
                             f"train.batch_size={batch}"])
    for key, value in model_options.items():
        setattr(run.model, key, value)
    build_shards(run, store)
    data, manifest = whole_graph(store, n_clips, run.model.use_negative)
    order = np.argsort(data_shard_order(data))
    model = build_model(run.model, data.clip_features.shape[1], seed=seed)
    valid = data.eval_sets["valid"]
    result = train(model, data.clip_features, data.graph,
                   TrainData(data.train_users.numpy()[order], data.train_videos.numpy()[order],
                             data.train_watched.numpy()[order]),
                   EvalData(*valid), run.train)
    model.load_state_dict(result.best_state)
    users, videos, labels = data.eval_sets["test"]
    return evaluate(model, data.clip_features, data.graph, users, videos, labels, (3, 5))


def data_shard_order(data) -> np.ndarray:
    """Global training position of each local training row (whole graph: one shard)."""
    order = np.empty(len(data.train_order), dtype=np.int64)
    order[data.train_row_of_order] = data.train_order
    return order


class VideoLevel(nn.Module):
    """Baseline: logit = MLP([user embedding ; W mean video feature])."""

    def __init__(self, n_users: int, n_features: int, dim: int = 64):
        super().__init__()
        self.users = nn.Embedding(n_users, dim)
        self.video = nn.Linear(n_features, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, users, video_features):
        return self.mlp(torch.cat([self.users(users), self.video(video_features)], -1))[:, 0]


def baseline(store: Store, seed: int, epochs: int) -> dict[str, float]:
    data, manifest = whole_graph(store, 4)
    video_features = data.clip_features.view(-1, 4, data.clip_features.shape[1]).mean(1)
    torch.manual_seed(seed)
    model = VideoLevel(len(data.user_rows), video_features.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    users, videos = data.train_users, data.train_videos
    labels = (data.train_watched == 4).float()
    rng = np.random.default_rng(seed)

    def task(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(users[idx], video_features[videos[idx]]), labels[idx])
        return loss, {"loss": loss.detach()}

    step = torch_step(task, optimizer)  # the trainers' step, on the baseline's loss

    def scores(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, v, y = data.eval_sets[split]
        with torch.no_grad():
            s = model(torch.as_tensor(u), video_features[torch.as_tensor(v)]).numpy()
        return u, y, s

    best, best_auc = None, -1.0
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(users)), max(1, len(users) // 1024)):
            step(torch.as_tensor(idx))
        auc = all_metrics(*scores("valid"), (5,))["auc"]
        if auc > best_auc:
            best_auc, best = auc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best)
    return all_metrics(*scores("test"), (3, 5))


def oracle(cfg: Config, store: Store) -> float:
    data, manifest = whole_graph(store, 4)
    rows, users, _ = split_pairs(store, data, manifest, "test")
    truth = store.table("truth").read().to_pandas()
    joined = rows.merge(truth, on=["user_id", "video_id", "timestamp"], how="left")
    p = joined["p_full"].to_numpy().clip(1e-7, 1 - 1e-7)
    return all_metrics(users, rows["full_watch"].to_numpy().astype(int), np.log(p / (1 - p)),
                       (3, 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="medium", choices=["small", "medium"])
    parser.add_argument("--root", default="out/bench_quality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1024, help="256 suits the small world")
    parser.add_argument("--grid", type=int, default=16,
                        help="G, frames extracted per video (64: 4 frames per clip at N_c=16)")
    args = parser.parse_args()
    from frame_dist.ray_runtime import init_ray

    torch.set_num_threads(2)
    init_ray(num_cpus=2)
    t0 = time.perf_counter()
    cfg = prepare(args.preset, args.root, args.grid)
    store = Store.from_config(cfg.store)
    print(f"data ready in {time.perf_counter() - t0:.0f}s")
    variants = [(f"FRAME N_c={n}", n, {}) for n in (1, 4, 8, 16)]
    variants += [("FRAME N_c=4 without negatives", 4, {"use_negative": False}),
                 ("FRAME N_c=4 raw features", 4, {"enhance": False})]
    rows = []
    for name, n_clips, options in variants:
        runs = [frame_variant(cfg, store, n_clips, seed, args.epochs, args.batch, **options)
                for seed in range(args.seeds)]
        rows.append((name, runs))
        print(f"{name}: " + ", ".join(f"{r['auc']:.4f}" for r in runs), flush=True)
    rows.append(("video-level baseline (user emb + mean video feature)",
                 [baseline(store, seed, args.epochs) for seed in range(args.seeds)]))
    truth = oracle(cfg, store)
    print(f"\n{'model':54s}{'AUC':>16s}{'Logloss':>16s}{'NDCG@5':>16s}")
    for name, runs in [*rows, ("oracle (true probabilities)", [truth])]:
        cells = []
        for key in ("auc", "logloss", "ndcg@5"):
            values = np.array([r[key] for r in runs])
            cells.append(f"{values.mean():.4f} ± {values.std():.4f}")
        print(f"{name:54s}" + "".join(f"{c:>16s}" for c in cells))
    print(f"\n{args.seeds} seed(s), {args.epochs} epochs max, early stopping on validation AUC; "
          f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
