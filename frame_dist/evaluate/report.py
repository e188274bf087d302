"""The run report: ``report.md`` in the run's folder with its plots, written after evaluation.

Sections:

1. the test metrics (model and, where the truth is known, the oracle: ``metrics_table``);
2. the oracle AUC, the ceiling any model can reach on this data;
3. metrics against N_c over every evaluated run of the store on the **same data** (the same
   committed interactions, frame features and encoder; one point when the run is alone, one per
   N_c after ``jobs.sweep``);
4. the training curve: per-epoch training loss and validation AUC (``metrics.json``'s history);
5. a case study (the paper's Figure 6): the clip scores y(u, c) (eq. 12) along one skipped test
   video for its user, with the clip where the user skipped marked.

Beside ``report.md``: ``metrics_by_n_clips.png``, ``training_curve.png``, ``case_study.png``
(relative links) and ``report.json`` (the numbers behind the report; section 3 of later reports
reads it). Everything is written through the store (atomic per file, local or ``s3://``); the
plots come before the markdown, so the markdown never links a missing image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from feature_store.frames import FRAME_FEATURES, committed_video_ids, stored_identity
from feature_store.store import Store
from frame_dist.config import Config
from frame_dist.evaluate.evaluation import EVALUATION, TestSplit, load_test_split, metrics_table
from frame_dist.graph.clip_graph import clip_labels
from frame_dist.model.frame import FRAME
from frame_dist.model.propagation import clip_ids
from frame_dist.train.artifacts import RUNS, RunMetrics, run_dir, run_path
from frame_dist.train.worker_data import WorkerData

REPORT = "report.md"
SUMMARY = "report.json"
N_CLIPS_PLOT = "metrics_by_n_clips.png"
CURVE_PLOT = "training_curve.png"
CASE_PLOT = "case_study.png"
COUNTS = ("n", "positives", "ranked_users")  # entries of a metrics dict that are not metrics


# --------------------------------------------------------------------------- numbers


def metric_names(metrics: dict[str, Any]) -> list[str]:
    """AUC, Logloss (calibrated, then raw), then Recall@K and NDCG@K by K: the metrics of one
    evaluation, in order."""
    names = [k for k in metrics if k not in COUNTS]
    ks = sorted({int(k.split("@")[1]) for k in names if "@" in k})
    ordered = [k for k in ("auc", "logloss", "logloss_raw") if k in names]
    ordered += [f"{m}@{k}" for k in ks for m in ("recall", "ndcg") if f"{m}@{k}" in names]
    return ordered + sorted(set(names) - set(ordered))


def data_identity(store: Store) -> str:
    """Which data a run was evaluated on: the committed interactions (their part files), the
    videos with frame features and the encoder. Runs with equal identities differ only in N_c
    and their own settings, so their metrics can be compared in one plot."""
    interactions = store.table("interactions").manifest() or {}
    parts = {
        "interactions": [p["path"] for p in interactions.get("parts", [])],
        "frame_features": sorted(committed_video_ids(store)),
        "encoder": stored_identity(store),
        "grid_size": store.table(FRAME_FEATURES).metadata().get("grid_size"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def n_clips_rows(store: Store, data: str) -> list[dict[str, Any]]:
    """The summaries (``report.json``) of every run of the store evaluated on ``data``."""
    rows = []
    for name in store.list_dir(RUNS):
        rel = run_path(name, SUMMARY)
        if not store.exists(rel):
            continue
        try:
            summary = store.read_json(rel)
        except (json.JSONDecodeError, OSError):  # a report being rewritten: leave it out
            continue
        if summary.get("data") == data:
            rows.append(summary)
    return sorted(rows, key=lambda r: (r["n_clips"], r["run"]))


def n_clips_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per run (N_c, run, every metric), then the oracle's row if known."""
    if not rows:
        return "(no evaluated run)"
    names = metric_names(rows[0]["model"])
    lines = ["| N_c | run | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['n_clips']} | {r['run']} | "
                     + " | ".join(_fmt(r["model"].get(k)) for k in names) + " |")
    oracle = _oracle(rows)
    if oracle is not None:
        lines.append("| oracle | | " + " | ".join(_fmt(oracle.get(k)) for k in names) + " |")
    return "\n".join(lines)


def n_clips_csv(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`n_clips_table` as CSV (full precision); the oracle's run is 'oracle'."""
    names = metric_names(rows[0]["model"]) if rows else []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["n_clips", "run", *names])
    for r in rows:
        writer.writerow([r["n_clips"], r["run"], *[r["model"].get(k) for k in names]])
    oracle = _oracle(rows)
    if oracle is not None:
        writer.writerow(["", "oracle", *[oracle.get(k) for k in names]])
    return out.getvalue()


def _oracle(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r["oracle"] for r in rows if r.get("oracle")), None)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- case study


@dataclass
class CaseStudy:
    """The clip scores of one skipped test interaction (the paper's Figure 6)."""

    user_id: str
    video_id: str
    timestamp: int
    duration_s: float
    watch_ratio: float  # r
    skip_clip: int  # s = floor(r * N_c) (graph.clip_graph.clip_labels): where the user left
    clip_scores: list[float]  # y(u, c) (eq. 12) for the clips c = 0 .. N_c - 1 of the video
    video_score: float  # y(u, v) (eq. 13): their mean
    probability: float  # P(full watch) = sigmoid(a y(u, v) + b), the run's calibration


def pick_skip(rows: pd.DataFrame, users: np.ndarray, n_clips: int) -> int | None:
    """Position (in ``rows``) of the case-study interaction, or None without a skipped one.

    The first test skip in (user_id, video_id, timestamp) order whose user played at least one
    clip before skipping (s > 0), so the curve shows both sides of the skip; failing that, the
    first test skip. Deterministic for the same data.
    """
    full = rows["full_watch"].to_numpy().astype(bool)
    watched = clip_labels(rows["watch_ratio"].to_numpy(), full, n_clips)
    skipped = rows[["user_id", "video_id", "timestamp"]].assign(position=np.arange(len(rows)))
    skipped = skipped[~full & (np.asarray(users) >= 0)]
    if skipped.empty:
        return None
    positions = skipped.sort_values(["user_id", "video_id", "timestamp"],
                                    kind="stable")["position"].to_numpy()
    played = positions[watched[positions] > 0]
    return int(played[0] if len(played) else positions[0])


@torch.no_grad()
def clip_scores_of(model: FRAME, data: WorkerData, user: int, video: int) -> np.ndarray:
    """y(u, c) (eq. 12) of local user ``user`` for the N_c clips of local video ``video``."""
    was_training = model.training
    model.eval()
    try:
        n_c = data.graph.clips_per_video
        device = model.layer_weights.device
        clips = clip_ids(torch.tensor([video], device=device), n_c)  # (N_c,)
        h_c, h_u_pos, h_u_neg = model.embeddings(data.clip_features, data.graph, clips)
        hn = None if h_u_neg is None else h_u_neg[user][None]  # (1, d)
        return model.clip_scores(h_u_pos[user][None], hn, h_c).float().cpu().numpy()  # (N_c,)
    finally:
        model.train(was_training)


def case_study(store: Store, run_name: str, test: TestSplit | None = None
               ) -> CaseStudy | None:
    """The case study of a trained run on the committed graph, or None without a test skip.

    ``test``: the run's :class:`TestSplit` when the evaluation already loaded it."""
    test = test if test is not None else load_test_split(store, run_name)
    model, data, n_clips = test.model, test.data, test.n_clips
    users, videos = test.users, test.videos
    rows = test.rows.reset_index(drop=True)
    i = pick_skip(rows, users, n_clips)
    if i is None:
        return None
    row = rows.iloc[i]
    scores = clip_scores_of(model, data, int(users[i]), int(videos[i]))
    skip = clip_labels(np.array([row["watch_ratio"]]), np.array([False]), n_clips)[0]
    return CaseStudy(str(row["user_id"]), str(row["video_id"]), int(row["timestamp"]),
                     float(row["duration_s"]), float(row["watch_ratio"]), int(skip),
                     [float(s) for s in scores], float(scores.mean()),
                     float(test.calibration.apply(np.array([scores.mean()]))[0]))


# --------------------------------------------------------------------------- plots


def _figure(ncols: int, nrows: int = 1, width: float = 4.0, height: float = 3.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)  # Agg, chosen from the format
    return buffer.getvalue()


def plot_metrics_by_n_clips(rows: list[dict[str, Any]], highlight: str | None = None) -> bytes:
    """PNG: one panel per metric, the runs' values against N_c (log2 axis), oracle dashed."""
    names = metric_names(rows[0]["model"])
    ncols = min(3, len(names))
    fig, axes = _figure(ncols, math.ceil(len(names) / ncols))
    n_clips = np.array([r["n_clips"] for r in rows])
    oracle = _oracle(rows)
    for ax, name in zip(axes.flat, names):
        values = np.array([np.nan if r["model"].get(name) is None else r["model"][name]
                           for r in rows], dtype=float)
        xs = np.unique(n_clips)
        mean = [np.nanmean(values[n_clips == x]) if np.isfinite(values[n_clips == x]).any()
                else np.nan for x in xs]
        ax.plot(xs, mean, "-", color="tab:blue", alpha=0.6)
        ax.plot(n_clips, values, "o", color="tab:blue", label="FRAME")
        if highlight is not None:
            mine = np.array([r["run"] == highlight for r in rows])
            ax.plot(n_clips[mine], values[mine], "*", color="tab:red", markersize=14,
                    label="this run")
        if oracle is not None and oracle.get(name) is not None:
            ax.axhline(oracle[name], color="gray", linestyle="--", label="oracle")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("N_c (clips per video)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    return _png(fig)


def plot_training_curve(history: list[dict[str, Any]], best_epoch: int | None = None) -> bytes:
    """PNG: training loss and validation AUC per epoch, the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(2)
    epochs = [h["epoch"] for h in history]
    auc = [h.get("valid", {}).get("auc", np.nan) for h in history]
    for ax, values, label in ((axes[0, 0], [h["loss"] for h in history], "training loss"),
                              (axes[0, 1], auc, "validation AUC")):
        ax.plot(epochs, values, "o-")
        if best_epoch:
            ax.axvline(best_epoch, color="tab:green", linestyle=":", label="best epoch")
            ax.legend(fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_case_study(case: CaseStudy) -> bytes:
    """PNG: y(u, c) along the video, the skip clip marked, the never-shown clips shaded."""
    fig, axes = _figure(1, width=6.0, height=3.6)
    ax = axes[0, 0]
    n_c = len(case.clip_scores)
    ax.plot(range(n_c), case.clip_scores, "o-", label="y(u, c)")
    ax.axhline(case.video_score, color="gray", linestyle=":", label="y(u, v) (mean)")
    ax.axvline(case.skip_clip, color="tab:red", label=f"skip (clip {case.skip_clip})")
    if case.skip_clip < n_c - 1:
        ax.axvspan(case.skip_clip + 0.5, n_c - 0.5, color="gray", alpha=0.15,
                   label="never shown")
    ax.set_xlim(-0.5, n_c - 0.5)
    ax.set_xticks(range(n_c))
    ax.set_xlabel("clip index c")
    ax.set_ylabel("clip score y(u, c)")
    ax.set_title(f"user {case.user_id}, video {case.video_id}: left at "
                 f"{case.watch_ratio * case.duration_s:.1f} s of {case.duration_s:.1f} s",
                 fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _png(fig)


# --------------------------------------------------------------------------- the report


def write_report(cfg: Config, store: Store, result: dict[str, Any],
                 test: TestSplit | None = None) -> str:
    """Write the report of ``result`` (an evaluation of ``cfg.train.run_name``); return the uri
    of ``report.md``. ``test``: the split the evaluation loaded, reused by the case study."""
    run = result["run"]
    rdir = run_dir(run)
    case = case_study(store, run, test)
    summary = {"run": run, "n_clips": result["n_clips"], "data": data_identity(store),
               "model": result["model"], "case_study": None if case is None else asdict(case)}
    if "oracle" in result:
        summary["oracle"] = result["oracle"]
    store.write_json(f"{rdir}/{SUMMARY}", summary)

    # this run's own summary, whatever a listing of the store returns
    rows = sorted([r for r in n_clips_rows(store, summary["data"]) if r["run"] != run]
                  + [summary], key=lambda r: (r["n_clips"], r["run"]))
    store.write_bytes_atomic(f"{rdir}/{N_CLIPS_PLOT}", plot_metrics_by_n_clips(rows, run))
    metrics = RunMetrics.read(store, run)
    if metrics is not None and metrics.history:
        store.write_bytes_atomic(f"{rdir}/{CURVE_PLOT}",
                                 plot_training_curve(metrics.history, metrics.best_epoch))
    if case is not None:
        store.write_bytes_atomic(f"{rdir}/{CASE_PLOT}", plot_case_study(case))
    store.write_text(f"{rdir}/{REPORT}", report_markdown(result, rows, metrics, case))
    return store.uri(rdir, REPORT)


def report_markdown(result: dict[str, Any], rows: list[dict[str, Any]],
                    metrics: RunMetrics | None, case: CaseStudy | None) -> str:
    """The text of report.md (plots linked by their file names)."""
    model = result["model"]
    out = [f"# Run report: {result['run']}", "",
           f"N_c = {result['n_clips']}; {model['n']} test interactions, {model['positives']} "
           "full watches.", "", "## Test metrics", "", metrics_table(result), ""]
    if "calibration" in result:
        cal = result["calibration"]
        out += [f"`logloss` scores the probabilities P(full watch) = sigmoid(a y + b) of the "
                f"model's logit y with the run's calibration a = {cal['a']:.4g}, b = "
                f"{cal['b']:.4g} (Platt scaling on the validation split, "
                "docs/model.md section 6); `logloss_raw` scores sigmoid(y). AUC, Recall@K and "
                "NDCG@K do not depend on it.", ""]
    if "oracle" in result:
        out += [f"Oracle AUC: **{result['oracle']['auc']:.4f}** (the true full-watch "
                "probabilities of the `truth` table, the simulation's or the data's own, scored "
                f"with the same metrics: the ceiling on this data). This run: {model['auc']:.4f}.",
                ""]
    else:
        out += ["Oracle AUC: not known (no `truth` table covers the test interactions; data "
                "that carries the true probability gets one with `ingest.truth_column`).", ""]

    out += ["## Metrics against N_c", "",
            f"Every evaluated run of this store on the same data ({len(rows)} run(s)); "
            "`jobs.sweep` adds one run per N_c. This run is the red star.", "",
            f"![metrics against N_c]({N_CLIPS_PLOT})", "", n_clips_table(rows), ""]

    out += ["## Training", ""]
    if metrics is not None and metrics.history:
        valid_auc = metrics.valid.get("auc")
        out += [f"![training curve]({CURVE_PLOT})", "",
                f"{metrics.epochs_run} epoch(s), best epoch {metrics.best_epoch}"
                + (f" (validation AUC {valid_auc:.4f})" if valid_auc is not None else "")
                + f", {metrics.global_step} steps on {metrics.workers} worker(s)"
                + (f"; resumed at steps {metrics.resumed_at_steps}"
                   if metrics.resumed_at_steps else "") + ".", ""]
    else:
        out += ["No training history (`metrics.json` is missing or empty).", ""]

    out += ["## Case study: clip scores along a skipped video", ""]
    if case is None:
        out += ["No skipped interaction in the test split.", ""]
    else:
        n_c = len(case.clip_scores)
        out += [f"![case study]({CASE_PLOT})", "",
                f"User `{case.user_id}` watched {case.watch_ratio:.2f} of test video "
                f"`{case.video_id}` ({case.watch_ratio * case.duration_s:.1f} s of "
                f"{case.duration_s:.1f} s) and skipped in clip s = floor(r N_c) = "
                f"{case.skip_clip}. FRAME's clip scores y(u, c) (eq. 12) before seeing this "
                f"interaction, with y(u, v) = {case.video_score:.4f} their mean (eq. 13):", "",
                "| clip | " + " | ".join(str(j) for j in range(n_c)) + " |",
                "|---" * (n_c + 1) + "|",
                "| y(u, c) | " + " | ".join(
                    (f"**{s:.4f}**" if j == case.skip_clip else f"{s:.4f}")
                    for j, s in enumerate(case.clip_scores)) + " |", "",
                "The skip clip is in bold; clips after it were never shown. The calibrated "
                f"probability of a full watch was sigmoid(a y(u, v) + b) = "
                f"{case.probability:.4f}.", ""]
    return "\n".join(out)


def run_summary(store: Store, run_name: str) -> str:
    """The metrics table of an evaluated run and the path of its report (for job output)."""
    rdir = run_dir(run_name)
    if not store.exists(run_path(run_name, EVALUATION)):
        return f"run {run_name}: not evaluated yet ({store.uri(rdir)})"
    result = store.read_json(run_path(run_name, EVALUATION))  # keys sorted: restore the order
    for who in ("model", "oracle"):
        if who in result:
            result[who] = {k: result[who][k] for k in metric_names(result[who])}
    lines = [metrics_table(result)]
    if store.exists(f"{rdir}/{REPORT}"):
        lines.append(f"report: {store.uri(rdir, REPORT)}")
    return "\n".join(lines)
