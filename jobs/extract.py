"""Stage [extract]: frame features of every video on the uniform grid, with Ray Data.

    ray job submit --working-dir . -- python -m jobs.extract --config configs/demo.yaml
    python -m jobs.extract --config configs/demo.yaml extract.weights=random

Reads the ``videos`` table (written by ingest), skips videos already committed from the same
source (uri, size and mtime or ETag: a changed video is extracted again, and said so), and commits
``frame_features`` part by part (a killed run resumes where it stopped); failed videos are listed
in ``extract_errors`` and retried by the next run. Uses the Ray cluster it finds (GPU encoder
actors when it has GPUs) or starts a local one. Exit codes: 0 done (some videos may have failed:
see the summary), 1 the stage failed, 2 the configuration was refused (including an encoder
identity that differs from the store's).
"""

from __future__ import annotations

import sys

from feature_store.lease import StageLease
from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.extract.pipeline import ExtractSummary, run_extract
from frame_dist.ray_runtime import init_ray


def extract(cfg: Config) -> ExtractSummary:
    store = Store.from_config(cfg.store)
    with StageLease(store, "extract"):  # one extraction per store at a time
        init_ray()
        return run_extract(cfg, store)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    return run_stage("extract", lambda: extract(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
