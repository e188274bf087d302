"""Stage [import]: precomputed frame or clip features into the store, in place of extraction.

    python -m jobs.import_features --config configs/demo.yaml extract.import_path=feats.npy \\
        extract.import_ids=ids.txt extract.import_name=clip-vit extract.grid_size=16
    python -m jobs.import_features --config configs/demo.yaml extract.import_path=feats.parquet \\
        extract.import_name=clip4 extract.import_kind=clips extract.grid_size=4 graph.n_clips=4

Reads a ``.npy`` array (V, G, F) with its ids file, or a Parquet file (``video_id``, ``feature``),
checks it against the ``videos`` table (ingest first, with the same ``extract.import_path`` so
videos without a uri are accepted) and commits ``frame_features`` under the identity
``external:<import_name>`` (docs/extract.md, "Bringing precomputed features"). Then run graph,
train, ... (or ``jobs.pipeline`` / ``jobs.sweep``: their extract step does nothing). Exit codes:
0 committed, 1 bad input (the message names the file and video), 2 refused configuration
(including a store that holds extracted features).
"""

from __future__ import annotations

import sys

from feature_store.lease import StageLease
from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.extract.imported import ImportSummary, run_import


def import_features(cfg: Config) -> ImportSummary:
    store = Store.from_config(cfg.store)
    with StageLease(store, "extract"):  # writes the table extraction writes: one at a time
        return run_import(cfg, store)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    return run_stage("import_features", lambda: import_features(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
