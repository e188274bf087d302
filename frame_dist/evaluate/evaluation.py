"""Stage [evaluate]: a trained run's metrics on the test split, next to the oracle's.

Rebuilds the model from the run's ``model.pt`` alone (``frame_dist.train.artifacts.SavedModel``),
propagates once over the whole committed graph (every shard merged: the single-process path,
fine up to millions of edges; the training stage computes the same metrics distributed), scores
the test interactions of the ``interactions`` table and computes AUC, Logloss, Recall@K and
NDCG@K with the trainer's evaluation (``frame_dist.train.trainer.evaluate``): ``logloss`` of the
probabilities under model.pt's calibration, ``logloss_raw`` of sigmoid(logit). Where the store
has a ``truth`` table (the synthetic world's, or one ingest wrote from ``ingest.truth_column``)
covering every test interaction, the **oracle** (the true full-watch probability of each) is
scored with the same metrics: the ceiling any model can reach on this data. Writes
``evaluation.json`` beside the run's checkpoints and rewrites the run's ``model_card.md`` with
these metrics (``frame_dist.train.artifacts.ModelCard``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from feature_store.store import Store
from frame_dist.config import Config
from frame_dist.evaluate.baselines import BaselineData, Pairs, count_baselines
from frame_dist.graph.clip_graph import IdMap, encode_interactions
from frame_dist.graph.manifest import GraphManifest
from frame_dist.model.calibration import Calibration
from frame_dist.model.frame import FRAME
from frame_dist.model.metrics import all_metrics
from frame_dist.score.embeddings import reads_clip_features
from frame_dist.train.artifacts import ModelCard, SavedModel, run_path
from frame_dist.train.trainer import evaluate
from frame_dist.train.worker_data import WorkerData, whole_graph

EVALUATION = "evaluation.json"  # in the run's folder


@dataclass
class TestSplit:
    """A trained run's model with the whole graph and its test pairs: what evaluation and the
    report's case study both read, loaded once (:func:`load_test_split`)."""

    model: FRAME  # eval mode
    n_clips: int
    calibration: Calibration  # model.pt's: P(full watch) = sigmoid(a y + b)
    data: WorkerData  # the whole graph (frame_dist.train.worker_data.whole_graph); clip features
    # only for a model that reads them (None when it owns its clip table)
    rows: pd.DataFrame  # the test rows of the interactions table
    users: np.ndarray  # (n,) local user of each row
    videos: np.ndarray  # (n,) local video of each row


def load_test_split(store: Store, run_name: str) -> TestSplit:
    saved = SavedModel.read(store, run_name)
    model, n_clips = saved.build(), saved.n_clips
    data, manifest = whole_graph(store, n_clips, model.use_negative,
                                 with_features=reads_clip_features(model))  # (C, F): if read
    rows, users, videos = split_pairs(store, data, manifest, "test")
    return TestSplit(model, n_clips, saved.calibration, data, rows, users, videos)


def split_pairs(store: Store, data: WorkerData, manifest: GraphManifest, split: str
                ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows of ``split`` with graph indices: (table rows, local users, local videos)."""
    table = store.table("interactions").read()
    table = table.filter(pc.equal(table["split"], split))
    table = table.filter(pc.is_in(table["video_id"], pa.array(manifest.video_ids)))
    users = IdMap(data.user_ids, name="user_id")  # the graph's user id map
    videos = IdMap(manifest.video_ids, name="video_id")
    enc = encode_interactions(table, users, videos, split=None, where=f"interactions[{split}]")
    local_user = np.full(len(users), -1, dtype=np.int64)
    local_user[data.user_rows] = np.arange(len(data.user_rows))
    local_video = np.searchsorted(data.video_ids, enc.video_idx)
    return table.to_pandas(), local_user[enc.user_idx], local_video


def evaluate_run(cfg: Config, store: Store, test: TestSplit | None = None) -> dict[str, Any]:
    """Test metrics of ``cfg.train.run_name`` (and the oracle's); writes evaluation.json.

    ``test``: the run's :class:`TestSplit` when the caller already loaded it (else loaded here).
    """
    test = test if test is not None else load_test_split(store, cfg.train.run_name)
    n_clips, rows, users = test.n_clips, test.rows, test.users
    labels = rows["full_watch"].to_numpy().astype(np.int64)
    result: dict[str, Any] = {
        "run": cfg.train.run_name, "n_clips": n_clips,
        "model": evaluate(test.model, test.data.clip_features, test.data.graph, users,
                          test.videos, labels, cfg.evaluate.ks, cfg.evaluate.batch_size,
                          calibration=test.calibration),
        "calibration": test.calibration.to_dict(),
    }
    result["baselines"] = run_count_baselines(store, test, labels, cfg.evaluate.ks)
    if store.table("truth").exists():
        truth = store.table("truth").read().to_pandas()
        joined = rows.merge(truth, on=["user_id", "video_id", "timestamp"], how="left")
        if joined["p_full"].notna().all():
            p = joined["p_full"].to_numpy().clip(1e-7, 1 - 1e-7)
            result["oracle"] = all_metrics(users, labels, np.log(p / (1 - p)), cfg.evaluate.ks)
    store.write_json(run_path(cfg.train.run_name, EVALUATION), result)
    # the card beside model.pt, now with the evaluated metrics and the oracle's
    ModelCard.for_run(store, cfg.train.run_name, evaluation=result).write(store)
    return result


def labelled_pairs(store: Store, data: WorkerData, manifest: GraphManifest, split: str
                   ) -> tuple[pd.DataFrame, Pairs]:
    """:func:`split_pairs` as (table rows, graph-indexed pairs with their full-watch labels)."""
    rows, users, videos = split_pairs(store, data, manifest, split)
    return rows, Pairs(users, videos, rows["full_watch"].to_numpy().astype(np.int64))


def run_count_baselines(store: Store, test: TestSplit, labels: np.ndarray,
                        ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Constant, user rate and video rate (``frame_dist.evaluate.baselines``) on the run's own
    split and indices: the yardstick next to the model in evaluation.json and the card."""
    manifest = GraphManifest.read(store, test.n_clips)
    pairs = {split: labelled_pairs(store, test.data, manifest, split)[1]
             for split in ("train", "valid")}
    data = BaselineData(pairs["train"], pairs["valid"], Pairs(test.users, test.videos, labels),
                        np.zeros((len(test.data.video_ids), 0)), len(test.data.user_rows),
                        len(test.data.video_ids))
    return count_baselines(data, tuple(ks))


def metrics_table(result: dict[str, Any]) -> str:
    """The evaluation as a markdown table (model and, where known, oracle)."""
    names = [k for k in result["model"] if k not in ("n", "positives", "ranked_users")]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for who in ("model", "oracle"):
        if who in result:
            lines.append(f"| {who} | " + " | ".join(
                f"{result[who][k]:.4f}" if k in result[who] else "-" for k in names) + " |")
    return "\n".join(lines)
