"""The end-to-end pipeline: every stage in order, each skipping work already committed.

    python -m jobs.pipeline --config configs/demo.yaml
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/demo.yaml

Stages talk only through the feature store (``store.root``), so a failed run can be re-launched
and continues where it stopped. The last lines printed are the run's metrics table and the path
of its report (``<store>/runs/<train.run_name>/report.md``).
"""

from __future__ import annotations

import sys
import time

from frame_dist.cli import EXIT_OK, parse_config, run_stage
from frame_dist.config import Config


def stages(cfg: Config) -> list[tuple[str, object]]:
    from jobs import evaluate, extract, graph, ingest, score, train

    return [
        ("ingest", lambda: ingest.ingest(cfg)),
        ("extract", lambda: extract.extract(cfg)),
        ("graph", lambda: graph.graph(cfg)),
        ("train", lambda: train.train(cfg)),
        ("evaluate", lambda: evaluate.evaluate(cfg, table=False)),  # the table comes last
        ("score", lambda: score.score(cfg)),
    ]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv, tracked=True)
    start = time.perf_counter()
    for name, fn in stages(cfg):
        t0 = time.perf_counter()
        print(f"== stage {name}", flush=True)
        rc = run_stage(name, fn, cfg)
        if rc != EXIT_OK:
            print(f"pipeline stopped: stage {name} failed (exit code {rc})", file=sys.stderr)
            return rc
        print(f"== stage {name} done in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"pipeline finished in {time.perf_counter() - start:.1f}s; store: {cfg.store.root}")
    from feature_store.store import Store
    from frame_dist.evaluate.report import run_summary

    print(run_summary(Store.from_config(cfg.store), cfg.train.run_name), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
