"""Stage [evaluate]: test metrics of a trained run, next to the oracle's, and the run report.

    python -m jobs.evaluate --config configs/demo.yaml train.run_name=frame
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/demo.yaml

Reads only the store (model.pt of the run, the committed graph, the interactions); writes
``<store>/runs/<run>/evaluation.json`` and the run report (``report.md`` with its plots, see
docs/report.md) beside it, and prints the metrics table and the report's path.
"""

from __future__ import annotations

import sys

from feature_store.lease import StageLease
from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.evaluate.evaluation import evaluate_run, load_test_split, metrics_table
from frame_dist.evaluate.report import write_report


def evaluate(cfg: Config, table: bool = True) -> dict:
    """Evaluate the run; print a line, and (``table``) the metrics table and the report path
    (jobs.pipeline prints those last, once)."""
    store = Store.from_config(cfg.store)
    with StageLease(store, f"evaluate-{cfg.train.run_name}"):
        test = load_test_split(store, cfg.train.run_name)  # read once: metrics and case study
        result = evaluate_run(cfg, store, test)
        report = write_report(cfg, store, result, test)
    print(f"evaluate: run {result['run']} (N_c={result['n_clips']}), "
          f"{result['model']['n']} test interactions")
    if table:
        print(metrics_table(result))
        print(f"report: {report}")
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    return run_stage("evaluate", lambda: evaluate(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
