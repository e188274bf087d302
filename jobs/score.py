"""Stage [score]: the top-K videos of every user (Ray Data over user chunks) -> ``scores``.

    python -m jobs.score --config configs/demo.yaml score.top_k=20
    python -m jobs.score --config configs/demo.yaml score.kernel=eager score.actors=2
    ray job submit --working-dir . -- python -m jobs.score --config configs/demo.yaml

Scores the trained run ``train.run_name`` (its model.pt) against every video of its graph, or the
videos of ``score.candidates`` (a Parquet or CSV file with a video_id column); with
``score.exclude_seen`` a user's training videos are never recommended. Writes the committed
table ``<store>/tables/scores`` (user_id, rank, video_id, score). Submitting again resumes: only
user chunks not yet committed are scored; another model or other score settings start over.
A partitioned graph is propagated by one Ray task per shard. ``score.kernel``,
``score.videos_per_block``, ``score.actors`` and ``score.shard_task_cpus`` tune the run without
changing its result. See docs/score.md.
"""

from __future__ import annotations

import sys

from feature_store.lease import StageLease
from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.score.pipeline import ScoreSummary, run_scoring


def score(cfg: Config) -> ScoreSummary:
    # refuses a missing run / graph / candidate file first; propagates and joins Ray
    # (init_ray) only when chunks are left to score; every setting comes from cfg.score
    store = Store.from_config(cfg.store)
    with StageLease(store, "score"):  # one writer of the scores table at a time
        return run_scoring(cfg, store)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    return run_stage("score", lambda: score(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
