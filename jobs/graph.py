"""Stage [graph N_c]: clip labels, R~^p / R~^n and user shards for one N_c.

    python -m jobs.graph --config configs/demo.yaml graph.n_clips=8 graph.n_shards=2
    ray job submit --working-dir . -- python -m jobs.graph --config configs/demo.yaml

Reads the committed interactions and frame features; skipped when both and the graph settings
are unchanged since the last build. Needs no cluster.
"""

from __future__ import annotations

import sys

from feature_store.lease import StageLease
from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.graph.shards import build_shards


def graph(cfg: Config) -> None:
    store = Store.from_config(cfg.store)
    with StageLease(store, f"graph-nc{cfg.graph.n_clips}"):  # one build per N_c at a time
        build = build_shards(cfg, store)
    if build.skipped:
        print(f"graph N_c={cfg.graph.n_clips}: skipped (inputs and settings unchanged)")
        return
    m = build.manifest
    print(f"graph N_c={m.n_clips}: {m.n_users} users x {m.n_videos * m.n_clips} clips, "
          f"nnz R^p {m.nnz_pos}, R^n {m.nnz_neg}; {len(m.shards)} shard(s) with edges "
          f"{[s.nnz_pos + s.nnz_neg for s in m.shards]}")
    if m.dropped_no_features:
        print(f"graph: {m.dropped_no_features} interaction(s) left out: their videos "
              "have no frame features (see the extract_errors table)")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    return run_stage("graph", lambda: graph(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
