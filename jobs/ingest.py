"""Stage [ingest]: validate interactions and videos into the store.

    python -m jobs.ingest --config configs/demo.yaml ingest.interactions=data/views.csv \\
        ingest.videos=data/videos.csv ingest.preset=kuairec ingest.bad_rows=quarantine
    ray job submit --working-dir . -- python -m jobs.ingest --config configs/demo.yaml

With ``ingest.interactions`` empty, the synthetic world of ``world.*`` is generated (or reused)
and ingested. Runs in the driver process: ingest needs no cluster.
"""

from __future__ import annotations

import sys

from feature_store.lease import StageLease
from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.ingest.interactions import ingest_is_current, run_ingest
from frame_dist.ingest.world import prepare_world


def ingest(cfg: Config) -> None:
    store = Store.from_config(cfg.store)
    with StageLease(store, "ingest"):  # one ingest per store at a time
        if not cfg.ingest.interactions:
            prepare_world(cfg, store)
        if ingest_is_current(cfg, store):
            print("ingest: skipped (sources and settings unchanged since the last commit)")
            return
        print(run_ingest(cfg, store))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    return run_stage("ingest", lambda: ingest(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
