"""Stage [evaluate]: test metrics of a trained run, next to the oracle's where the truth is known.

    python -m jobs.evaluate --config configs/demo.yaml train.run_name=frame
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/demo.yaml

Reads only the store (model.pt of the run, the committed graph, the interactions); writes
``<store>/runs/<run>/evaluation.json`` and prints the metrics table.
"""

from __future__ import annotations

import sys

from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.evaluate import evaluate_run, metrics_table


def evaluate(cfg: Config) -> dict:
    result = evaluate_run(cfg, Store.from_config(cfg.store))
    print(f"evaluate: run {result['run']} (N_c={result['n_clips']}), "
          f"{result['model']['n']} test interactions")
    print(metrics_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    return run_stage("evaluate", lambda: evaluate(cfg))


if __name__ == "__main__":
    sys.exit(main())
