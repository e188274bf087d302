"""Quality on a suite of synthetic worlds: FRAME beside strong baselines, ceiling and oracle.

    .venv/bin/python -m benchmarks.quality                        # every world, 3 seeds
    .venv/bin/python -m benchmarks.quality --worlds scenes-8 --seeds 1 --variants default
    .venv/bin/python -m benchmarks.quality --list                 # worlds and variants

Each world (``WORLDS``; 1,500+ users, deterministic) goes through the real stages into its own
store: feature worlds are written by ``frame_dist.ingest.feature_world`` and enter through
``jobs.ingest`` + ``jobs.import_features``; the ``mp4`` world renders videos and runs
``jobs.extract`` (Ray Data, ResNet-50 trunk). Graphs are built by ``build_shards`` for every N_c;
FRAME trains with the single-process trainer (the distributed trainer computes the same,
tests/test_train_loop.py) and is scored by ``trainer.evaluate`` on the test split.

Per world the table shows test AUC / Logloss / NDCG@5, mean +- std over seeds, for

* FRAME variants (``VARIANTS``): frame-dist's defaults at N_c in {1, 4, 8, 16}, the paper's
  configuration (``model.preset=paper``: every equation as printed), and the defaults with one
  decision reverted at a time (ablations), without negative clips;
* the baselines of ``frame_dist.evaluate.baselines`` (constant, user rate, video rate, FM,
  LightGCN), on the same split and metrics code;
* the learnable ceiling (``frame_dist.evaluate.ceiling``) and the oracle (true p_full);

and the gap FRAME closes: (FRAME - best baseline) / (ceiling - best baseline), in AUC. Results
are also written as JSON (``--out``) so a long run can be resumed (``--resume``) and tabulated.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch

from feature_store.store import Store
from frame_dist.config import Config, WorldConfig, load_config
from frame_dist.evaluate.baselines import BaselineData, logit, run_baselines
from frame_dist.evaluate.ceiling import WorldModelFit, gap_closed, world_indices
from frame_dist.evaluate.evaluation import labelled_pairs
from frame_dist.graph.shards import build_shards
from frame_dist.ingest.feature_world import FeatureSpec, write_feature_world
from frame_dist.ingest.synthetic import World, simulate_world
from frame_dist.model.metrics import all_metrics
from frame_dist.train.trainer import EvalData, TrainData, build_model, evaluate, train
from frame_dist.train.worker_data import whole_graph

KS = (3, 5)
SUITE_SIZE = dict(n_users=1500, n_videos=2000, interactions_per_user=36)
# Worlds: WorldConfig overrides + frame features (None: the mp4 world, extracted by ResNet-50).
# Scene counts are per video (scenes last about 1 / count of it); dislike_fraction keeps the
# full-watch rate near 30-40% as scenes get shorter (more scenes, more chances to skip).
WORLDS: dict[str, tuple[dict[str, Any], FeatureSpec | None]] = {
    "scenes-2": (dict(min_scenes=2, max_scenes=2, dislike_fraction=0.3), FeatureSpec()),
    "scenes-4": (dict(min_scenes=4, max_scenes=4, dislike_fraction=0.2), FeatureSpec()),
    "scenes-8": (dict(min_scenes=8, max_scenes=8, n_topics=12, dislike_fraction=0.12),
                 FeatureSpec()),
    "scenes-16": (dict(min_scenes=16, max_scenes=16, n_topics=12, dislike_fraction=0.07,
                       max_duration_s=12.0), FeatureSpec(grid=32)),
    "dense": (dict(min_scenes=8, max_scenes=8, n_topics=12, dislike_fraction=0.12,
                   interactions_per_user=120), FeatureSpec()),
    "topics-32": (dict(min_scenes=8, max_scenes=8, n_topics=32, dislike_fraction=0.12),
                  FeatureSpec()),
    "noisy-frames": (dict(min_scenes=8, max_scenes=8, n_topics=12, dislike_fraction=0.12),
                     FeatureSpec(noise=6.0)),
    "patience": (dict(min_scenes=8, max_scenes=8, n_topics=12, dislike_fraction=0.06,
                      impatience_sigma=1.0, base_hazard=0.1, dislike_hazard=0.7), FeatureSpec()),
    "mp4": (dict(preset="medium"), None),
}
PAPER = ["model.preset=paper"]
# name -> (N_c, config overrides); the default configuration has no overrides
VARIANTS: dict[str, tuple[int, list[str]]] = {
    "default N_c=1": (1, []),
    "default N_c=4": (4, []),
    "default N_c=8": (8, []),
    "default N_c=16": (16, []),
    "paper N_c=4": (4, PAPER),
    "paper N_c=8": (8, PAPER),
    "default N_c=8 / mean of clip logits": (8, ["model.aggregation=mean"]),
    "default N_c=8 / unweighted clip losses": (8, ["train.position_weights=false"]),
    "default N_c=8 / full-watch positives": (8, ["graph.positives=full_watch"]),
    "default N_c=8 / symmetric normalisation": (8, ["graph.normalisation=symmetric"]),
    "default N_c=8 without negatives": (8, ["model.use_negative=false"]),
}
DEFAULT_VARIANTS = ["default N_c=1", "default N_c=4", "default N_c=8", "default N_c=16",
                    "paper N_c=4", "default N_c=8 without negatives"]


def world_config(name: str, root: str) -> tuple[WorldConfig, FeatureSpec | None]:
    overrides, spec = WORLDS[name]
    base = {} if spec is None else {"preset": "custom", **SUITE_SIZE}
    cfg = WorldConfig(**{**base, **overrides, "out_dir": os.path.join(root, name, "world")})
    if spec is None:  # the mp4 world's sizes come from its preset
        cfg = load_config(None, [f"world.preset={cfg.preset}"]).world
        cfg.out_dir = os.path.join(root, name, "world")
    return cfg, spec


def prepare(name: str, root: str) -> tuple[Config, World]:
    """The world's store, ingested and with frame features; returns (config, world)."""
    from jobs.extract import extract
    from jobs.import_features import import_features
    from jobs.ingest import ingest

    world_cfg, spec = world_config(name, root)
    store_root = os.path.join(root, name, "store")
    if spec is None:
        cfg = load_config(None, [f"world.preset={world_cfg.preset}",
                                 f"world.out_dir={world_cfg.out_dir}",
                                 f"store.root={store_root}", "extract.grid_size=16",
                                 "extract.image_size=64", "extract.weights=random",
                                 "extract.batch_size=64"])
        ingest(cfg)
        extract(cfg)
        return cfg, simulate_world(cfg.world)
    fw = write_feature_world(world_cfg, spec, world_cfg.out_dir)
    cfg = load_config(None, [f"store.root={store_root}", *fw.import_overrides(name)])
    ingest(cfg)
    store = Store.from_config(cfg.store)
    if not store.table("frame_features").exists():
        import_features(cfg)
    return cfg, fw.world


def run_config(cfg: Config, n_clips: int, seed: int, overrides: list[str], epochs: int
               ) -> Config:
    return load_config(None, [f"store.root={cfg.store.root}",
                              f"extract.grid_size={cfg.extract.grid_size}",
                              f"graph.n_clips={n_clips}", f"train.seed={seed}",
                              f"train.epochs={epochs}", *overrides])


def frame_variant(cfg: Config, n_clips: int, seed: int, overrides: list[str], epochs: int
                  ) -> dict[str, float]:
    """Train FRAME on the world's store with the default config + overrides; test metrics."""
    run = run_config(cfg, n_clips, seed, overrides, epochs)
    store = Store.from_config(run.store)
    build_shards(run, store)
    data, _ = whole_graph(store, n_clips, run.model.use_negative)
    order = np.empty(len(data.train_order), dtype=np.int64)  # global training order
    order[data.train_row_of_order] = data.train_order
    rows = np.argsort(order)
    model = build_model(run.model, data.clip_features.shape[1], seed=seed)
    result = train(model, data.clip_features, data.graph,
                   TrainData(data.train_users.numpy()[rows], data.train_videos.numpy()[rows],
                             data.train_watched.numpy()[rows]),
                   EvalData(*data.eval_sets["valid"]), run.train)
    model.load_state_dict(result.best_state)
    metrics = evaluate(model, data.clip_features, data.graph, *data.eval_sets["test"], KS,
                       calibration=result.calibration)
    metrics["best_epoch"] = result.best_epoch
    return metrics


def baseline_data(cfg: Config) -> tuple[BaselineData, dict[str, Any]]:
    """The N_c = 1 graph's split as pairs (FRAME's indices) and the test rows' table."""
    run = run_config(cfg, 1, 0, [], 1)
    store = Store.from_config(run.store)
    build_shards(run, store)
    data, manifest = whole_graph(store, 1)
    splits, tables = {}, {}
    for split in ("train", "valid", "test"):
        tables[split], splits[split] = labelled_pairs(store, data, manifest, split)
    return (BaselineData(splits["train"], splits["valid"], splits["test"],
                         data.clip_features.numpy(), len(data.user_rows), len(data.video_ids)),
            tables)


def reference_rows(world: World, data: BaselineData, tables: dict[str, Any]
                   ) -> dict[str, dict[str, float]]:
    """The learnable ceiling and the oracle on the test split."""
    train, test = tables["train"], tables["test"]
    tu, tv = world_indices(world, train["user_id"], train["video_id"])
    fit = WorldModelFit(world).fit(tu, tv, train["play_time_s"].to_numpy(),
                                   train["full_watch"].to_numpy())
    su, sv = world_indices(world, test["user_id"], test["video_id"])
    truth = world.outcome.p_full
    key = dict(zip(zip(world.users.user_ids[world.user_index].tolist(),
                       world.layout.video_ids[world.video_index].tolist(),
                       world.timestamp.tolist()), range(len(truth))))
    oracle = truth[[key[(u, v, int(t))] for u, v, t in zip(test["user_id"], test["video_id"],
                                                            test["timestamp"])]]
    return {"ceiling (world model fitted on train rows, true topics)":
            all_metrics(data.test.users, data.test.labels, logit(fit.p_full(su, sv)), KS),
            "oracle (true probabilities)":
            all_metrics(data.test.users, data.test.labels, logit(oracle), KS)}


def summarise(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation over seeds of AUC, Logloss (calibrated where the model has
    a calibration), raw Logloss (of sigmoid(y)) and NDCG@5."""
    def values(key: str) -> list[float]:
        return [r.get(key, r["logloss"]) for r in runs]

    return {key: (float(np.mean(values(key))), float(np.std(values(key))))
            for key in ("auc", "logloss", "logloss_raw", "ndcg@5")}


def print_world(name: str, result: dict[str, Any]) -> None:
    print(f"\n### {name}: {result['counts']}\n")
    print("| model | AUC | Logloss | Logloss (raw) | NDCG@5 | gap closed |\n"
          "|---|---|---|---|---|---|")
    best_name, best = result["best_baseline"]
    ceiling = result["reference"]["ceiling (world model fitted on train rows, true topics)"]
    for label, runs in [*result["frame"].items(), *result["baselines"].items(),
                        *result["reference"].items()]:
        runs = runs if isinstance(runs, list) else [runs]
        s = summarise(runs)
        cells = [f"{m:.4f} ± {d:.4f}" if len(runs) > 1 else f"{m:.4f}" for m, d in s.values()]
        gap = (f"{gap_closed(s['auc'][0], best, ceiling['auc']):.2f}"
               if label in result["frame"] else "")
        print(f"| {label} | " + " | ".join(cells) + f" | {gap} |")
    print(f"\nbest baseline: {best_name} (AUC {best:.4f})")
    for line in targets(name, result):
        print(f"- {line}")


FINE_WORLDS = ("scenes-8", "scenes-16", "dense", "topics-32", "noisy-frames", "patience")


def targets(name: str, result: dict[str, Any]) -> list[str]:
    """The issue's targets on one world, as lines "PASS/MISS/n.a. <target>: <numbers>"."""
    frame = {k: summarise(v) for k, v in result["frame"].items()}
    auc = {k: v["auc"] for k, v in frame.items()}
    ceiling = result["reference"]["ceiling (world model fitted on train rows, true topics)"]
    best_name, best = result["best_baseline"]
    lines = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        lines.append(f"{'n.a.' if ok is None else 'PASS' if ok else 'MISS'} {label}: {detail}")

    defaults = {k: v for k, v in auc.items() if k.startswith("default N_c=") and "/" not in k
                and "without" not in k}
    if defaults:
        top = max(defaults, key=lambda k: defaults[k][0])
        gap = gap_closed(defaults[top][0], best, ceiling["auc"])
        check("gap closed >= 2/3", gap >= 2 / 3, f"{top} {defaults[top][0]:.4f}, {best_name} "
              f"{best:.4f}, ceiling {ceiling['auc']:.4f}: {gap:.2f}")

    def ahead(fine: str, coarse: str, stds: float) -> None:
        if fine in auc and coarse in auc:
            (a, sa), (b, sb) = auc[fine], auc[coarse]
            spread = max(sa, sb)
            ok = a - b > stds * spread if stds > 0 else a - b >= stds * spread
            one_seed = min(len(result["frame"][fine]), len(result["frame"][coarse])) < 2
            check(f"{fine} vs {coarse}" + (" (one seed: no spread)" if one_seed else ""),
                  None if one_seed and stds != 0 else ok,
                  f"{a:.4f} ± {sa:.4f} vs {b:.4f} ± {sb:.4f}")

    if name in FINE_WORLDS:
        ahead("default N_c=8", "default N_c=4", 2)
        ahead("default N_c=4", "default N_c=1", 2)
        ahead("default N_c=16", "default N_c=8", -1)
    ahead("default N_c=8", "default N_c=8 without negatives", 0.0)
    base_loss = min(float(np.mean([r["logloss"] for r in runs]))
                    for runs in result["baselines"].values())
    for variant in ("default N_c=8", "default N_c=4"):
        if variant in frame:
            loss = frame[variant]["logloss"][0]
            check(f"{variant} calibrated Logloss <= best baseline's", loss <= base_loss,
                  f"{loss:.4f} vs {base_loss:.4f}")
            break
    return lines


SUMMARY_VARIANTS = ("default N_c=1", "default N_c=4", "default N_c=8", "default N_c=16",
                    "paper N_c=4")


def summary_table(done: dict[str, Any]) -> str:
    """One markdown row per world: test AUC of the FRAME variants (mean ± std over the seeds
    run), the best baseline, the ceiling and the oracle, and the gap the best default closes."""
    head = ["world", "seeds", *SUMMARY_VARIANTS, "best baseline", "ceiling", "oracle",
            "gap closed"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, result in done.items():
        if "reference" not in result:
            continue
        frame = {k: summarise(v)["auc"] for k, v in result["frame"].items()}
        seeds = max((len(v) for v in result["frame"].values()), default=0)
        runs = {k: len(v) for k, v in result["frame"].items()}
        cells = [f"{frame[v][0]:.4f} ± {frame[v][1]:.4f}" if runs.get(v, 0) > 1
                 else f"{frame[v][0]:.4f}" if v in frame else "-" for v in SUMMARY_VARIANTS]
        baselines = {k: float(np.mean([r["auc"] for r in v]))
                     for k, v in result["baselines"].items()}
        best_name, best = max(baselines.items(), key=lambda kv: kv[1])
        ref = result["reference"]
        ceiling = ref["ceiling (world model fitted on train rows, true topics)"]["auc"]
        defaults = [frame[v][0] for v in SUMMARY_VARIANTS[:4] if v in frame]
        gap = f"{gap_closed(max(defaults), best, ceiling):.2f}" if defaults else "-"
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {best_name} "
                     f"{best:.4f} | {ceiling:.4f} | "
                     f"{ref['oracle (true probabilities)']['auc']:.4f} | {gap} |")
    return "\n".join(lines)


def run_world(name: str, args: argparse.Namespace, done: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg, world = prepare(name, args.root)
    result = done.get(name) or {"frame": {}}
    if "baselines" not in result:
        data, tables = baseline_data(cfg)
        runs = [run_baselines(data, seed, KS) for seed in range(args.seeds)]
        result["baselines"] = {key: [r[key] for r in runs] for key in runs[0]}
        result["reference"] = reference_rows(world, data, tables)
        full = np.concatenate([data.train.labels, data.valid.labels, data.test.labels])
        result["counts"] = (f"{world.users.n_users} users, {world.layout.n_videos} videos, "
                            f"{len(full)} views, full-watch rate {full.mean():.2f}")
    for variant in args.variants:
        n_clips, overrides = VARIANTS[variant]
        runs = result["frame"].setdefault(variant, [])
        for seed in range(len(runs), args.seeds):
            runs.append(frame_variant(cfg, n_clips, seed, overrides, args.epochs))
            print(f"{name} / {variant} / seed {seed}: AUC {runs[-1]['auc']:.4f}", flush=True)
            done[name] = result
            save(args.out, done)
    baselines = {k: float(np.mean([r["auc"] for r in v]))
                 for k, v in result["baselines"].items()}
    result["best_baseline"] = max(baselines.items(), key=lambda kv: kv[1])
    result["seconds"] = result.get("seconds", 0.0) + time.perf_counter() - t0
    done[name] = result
    save(args.out, done)
    return result


def save(path: str, done: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".part", "w") as f:
        json.dump(done, f, indent=1, default=float)
    os.replace(path + ".part", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default=",".join(w for w in WORLDS if w != "mp4"),
                        help="comma-separated names of WORLDS (mp4 renders and extracts videos)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated names of VARIANTS, or 'all'")
    parser.add_argument("--root", default="out/bench_quality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default="", help="results JSON (default: <root>/results.json)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--list", action="store_true", help="print worlds and variants")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all CPUs)")
    parser.add_argument("--summary", nargs="*", metavar="JSON",
                        help="print the cross-world table of these results files (default: "
                             "--out) and every world's targets, without training")
    args = parser.parse_args()
    if args.list:
        for name, (overrides, spec) in WORLDS.items():
            print(f"world {name}: {overrides} {spec if spec else '(mp4 + ResNet-50 extract)'}")
        for name, (n_clips, overrides) in VARIANTS.items():
            print(f"variant {name}: N_c={n_clips} {' '.join(overrides)}")
        return
    if args.summary is not None:
        done = {}
        for path in args.summary or [args.out or os.path.join(args.root, "results.json")]:
            with open(path) as f:
                done.update(json.load(f))
        print(summary_table(done))
        for name, result in done.items():
            if "reference" in result and "best_baseline" in result:
                print(f"\n{name}:\n" + "\n".join(f"- {t}" for t in targets(name, result)))
        return
    args.variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS] + [
        w for w in args.worlds.split(",") if w not in WORLDS]
    if unknown:
        parser.error(f"unknown world(s) or variant(s): {unknown}; see --list")
    args.out = args.out or os.path.join(args.root, "results.json")
    done = {}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            done = json.load(f)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    if "mp4" in args.worlds.split(","):
        from frame_dist.ray_runtime import init_ray
        init_ray(num_cpus=os.cpu_count())
    t0 = time.perf_counter()
    for name in args.worlds.split(","):
        print_world(name, run_world(name, args, done))
    print(f"\n{args.seeds} seed(s), at most {args.epochs} epochs, early stopping on validation "
          f"AUC; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
