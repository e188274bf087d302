"""Stage [evaluate]: test metrics of a trained run, next to the oracle's, and the run report.

    python -m jobs.evaluate --config configs/demo.yaml train.run_name=frame
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/demo.yaml

Reads only the store (model.pt of the run, the committed graph, the interactions); writes
``<store>/runs/<run>/evaluation.json`` and the run report (``report.md`` with its plots, see
docs/report.md) beside it, and prints the metrics table and the report's path. With tracking on
(``tracking.mlflow_uri`` or ``MLFLOW_TRACKING_URI``, docs/tracking.md) it logs the metrics, the
report, its plots and the model card into the run's MLflow run.
"""

from __future__ import annotations

import sys

from feature_store.lease import StageLease
from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.evaluate.evaluation import evaluate_run, load_test_split, metrics_table
from frame_dist.evaluate.report import (
    CASE_PLOT,
    CURVE_PLOT,
    N_CLIPS_PLOT,
    REPORT,
    SUMMARY,
    write_report,
)
from frame_dist.tracking import log_evaluation, require_mlflow
from frame_dist.train.artifacts import ModelCard

# the run's files the evaluate stage logs to MLflow (those that exist)
TRACKED_FILES = [REPORT, SUMMARY, "evaluation.json", N_CLIPS_PLOT, CURVE_PLOT, CASE_PLOT,
                 ModelCard.FILE]


def evaluate(cfg: Config, table: bool = True) -> dict:
    """Evaluate the run; print a line, and (``table``) the metrics table and the report path
    (jobs.pipeline prints those last, once)."""
    require_mlflow(cfg)  # tracking asked without the extra: refused before anything runs
    store = Store.from_config(cfg.store)
    with StageLease(store, f"evaluate-{cfg.train.run_name}"):
        test = load_test_split(store, cfg.train.run_name)  # read once: metrics and case study
        result = evaluate_run(cfg, store, test)
        report = write_report(cfg, store, result, test)
        tracked = log_evaluation(cfg, store, result, TRACKED_FILES)  # None: tracking off
    print(f"evaluate: run {result['run']} (N_c={result['n_clips']}), "
          f"{result['model']['n']} test interactions"
          + (f"; logged to MLflow: {tracked.where()}" if tracked else ""))
    if table:
        print(metrics_table(result))
        print(f"report: {report}")
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv, tracked=True)
    return run_stage("evaluate", lambda: evaluate(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
