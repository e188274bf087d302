"""The N_c sweep: one extraction, then graph + train + evaluate for every N_c, one table.

    python -m jobs.sweep --config configs/demo.yaml 'sweep.n_clips=[1,2,4,8,16]'
    ray job submit --working-dir . -- python -m jobs.sweep --config configs/demo.yaml

Runs ingest and extract once (both skip committed work), then for each N_c of ``sweep.n_clips``
the graph (clip features are means of the committed grid frames: no video is decoded again),
a training run ``<train.run_name>_nc<N_c>`` and its evaluation with the run report. Every stage
skips what is already committed, so a rerun is cheap and a stopped sweep continues. The table
(markdown, JSON, CSV) and a plot of the metrics against N_c go to ``<store>/sweeps/<name>/``
after every N_c; the table is printed at the end. Exit codes as every job (0, 1, 2).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.evaluate.report import n_clips_table
from frame_dist.evaluate.sweep import run_config, sweep_n_clips, sweep_name, sweep_row, write_sweep


def sweep(cfg: Config) -> list[dict]:
    from jobs import evaluate, extract, graph, ingest, train

    store = Store.from_config(cfg.store)
    values = sweep_n_clips(cfg)
    print(f"sweep {sweep_name(cfg)}: N_c in {values} on a grid of "
          f"{cfg.extract.grid_size} frames", flush=True)
    ingest.ingest(cfg)
    summary = extract.extract(cfg)
    extracted = {k: v for k, v in asdict(summary).items() if k != "failures"}
    rows: list[dict] = []
    for n_clips in values:
        run_cfg = run_config(cfg, n_clips)
        print(f"== sweep N_c={n_clips}: run {run_cfg.train.run_name}", flush=True)
        t0 = time.perf_counter()
        for stage, fn in (("graph", graph.graph), ("train", train.train),
                          ("evaluate", evaluate.evaluate)):
            try:
                fn(run_cfg)
            except Exception:
                print(f"sweep: N_c={n_clips} stopped at stage {stage}; rerun the sweep to "
                      "continue from there", file=sys.stderr)
                raise
        rows.append(sweep_row(store, run_cfg))
        uris = write_sweep(store, cfg, rows, extracted)
        print(f"== sweep N_c={n_clips} done in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"sweep {sweep_name(cfg)}: test metrics against N_c "
          f"({summary.done} video(s) decoded by this sweep)")
    print(n_clips_table(rows))
    print(f"sweep table: {uris['table']}\nplot: {uris['plot']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv, tracked=True)
    return run_stage("sweep", lambda: sweep(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
