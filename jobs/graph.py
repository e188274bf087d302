"""Stage [graph N_c]: clip labels, R~^p / R~^n and user shards for one N_c.

    python -m jobs.graph --config configs/demo.yaml graph.n_clips=8 graph.n_shards=2
    ray job submit --working-dir . -- python -m jobs.graph --config configs/demo.yaml

Reads the committed interactions and frame features; skipped when both and the graph settings
are unchanged since the last build. Needs no cluster.
"""

from __future__ import annotations

import sys

from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.graph.shards import build_shards


def graph(cfg: Config) -> None:
    manifest = build_shards(cfg, Store.from_config(cfg.store))
    if manifest.get("skipped"):
        print(f"graph N_c={cfg.graph.n_clips}: skipped (inputs and settings unchanged)")
        return
    shards = manifest["shards"]
    print(f"graph N_c={manifest['n_clips']}: {manifest['n_users']} users x "
          f"{manifest['n_videos'] * manifest['n_clips']} clips, nnz R^p {manifest['nnz_pos']}, "
          f"R^n {manifest['nnz_neg']}; {len(shards)} shard(s) with edges "
          f"{[s['nnz_pos'] + s['nnz_neg'] for s in shards]}")
    if manifest["dropped_no_features"]:
        print(f"graph: {manifest['dropped_no_features']} interaction(s) left out: their videos "
              "have no frame features (see the extract_errors table)")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    return run_stage("graph", lambda: graph(cfg))


if __name__ == "__main__":
    sys.exit(main())
