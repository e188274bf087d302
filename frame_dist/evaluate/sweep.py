"""The N_c sweep (the paper's Table 4, extended): one run per N_c on the same frame features.

Clip features for any N_c that divides the grid G are means of the committed grid frames
(eq. 1), so the sweep extracts once and only rebuilds graphs, trains and evaluates per N_c
(``jobs/sweep.py`` runs the stages). This module names the runs and writes the sweep's table:

    <store>/sweeps/<name>/sweep.md                    the markdown table (also printed)
    <store>/sweeps/<name>/sweep.json                  the numbers, the runs, the extraction
    <store>/sweeps/<name>/sweep.csv                   one row per N_c (plus the oracle's)
    <store>/sweeps/<name>/metrics_by_n_clips.png      every metric against N_c

``<name>`` is ``sweep.name`` (default ``train.run_name``), each run ``<train.run_name>_nc<N_c>``.
"""

from __future__ import annotations

from typing import Any

from feature_store.store import Store
from frame_dist.config import Config, from_dict
from frame_dist.evaluate.evaluation import EVALUATION
from frame_dist.evaluate.report import n_clips_csv, n_clips_table, plot_metrics_by_n_clips
from frame_dist.train.artifacts import run_path

DEFAULT_N_CLIPS = (1, 2, 4, 8, 16, 32, 64)  # without sweep.n_clips: those that divide G


def sweep_n_clips(cfg: Config) -> list[int]:
    """The N_c values of the sweep: ``sweep.n_clips``, or the powers of two <= 64 dividing G."""
    if cfg.sweep.n_clips:
        return list(cfg.sweep.n_clips)
    return [n for n in DEFAULT_N_CLIPS if cfg.extract.grid_size % n == 0]


def sweep_name(cfg: Config) -> str:
    return cfg.sweep.name or cfg.train.run_name


def sweep_dir(cfg: Config) -> str:
    return f"sweeps/{sweep_name(cfg)}"


def run_config(cfg: Config, n_clips: int) -> Config:
    """``cfg`` for one point of the sweep: ``graph.n_clips`` and its own ``train.run_name``."""
    point = from_dict(cfg.to_dict())
    point.graph.n_clips = n_clips
    point.train.run_name = f"{cfg.train.run_name}_nc{n_clips}"
    return point.validate()


def sweep_row(store: Store, run_cfg: Config) -> dict[str, Any]:
    """One row of the table: the run's ``evaluation.json`` (model and oracle metrics)."""
    result = store.read_json(run_path(run_cfg.train.run_name, EVALUATION))
    row = {"n_clips": result["n_clips"], "run": result["run"], "model": result["model"]}
    if "oracle" in result:
        row["oracle"] = result["oracle"]
    return row


def write_sweep(store: Store, cfg: Config, rows: list[dict[str, Any]],
                extract: dict[str, Any]) -> dict[str, str]:
    """Write the table, its JSON and CSV forms and the plot; return their uris by kind."""
    out = sweep_dir(cfg)
    table = n_clips_table(rows)
    store.write_json(f"{out}/sweep.json", {
        "name": sweep_name(cfg), "n_clips": sweep_n_clips(cfg),
        "grid_size": cfg.extract.grid_size, "rows": rows,
        "oracle": next((r["oracle"] for r in rows if r.get("oracle")), None),
        "extract": extract})
    store.write_text(f"{out}/sweep.csv", n_clips_csv(rows))
    uris = {"json": store.uri(out, "sweep.json"), "csv": store.uri(out, "sweep.csv")}
    if rows:
        store.write_bytes_atomic(f"{out}/metrics_by_n_clips.png", plot_metrics_by_n_clips(rows))
        uris["plot"] = store.uri(out, "metrics_by_n_clips.png")
    store.write_text(f"{out}/sweep.md", f"# N_c sweep: {sweep_name(cfg)}\n\n{table}\n\n"
                     "![metrics against N_c](metrics_by_n_clips.png)\n")
    uris["table"] = store.uri(out, "sweep.md")
    return uris
