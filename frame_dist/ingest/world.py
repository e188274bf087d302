"""The synthetic world as a pipeline source: generate it, then point ingest at its files."""

from __future__ import annotations

import os
from typing import Any

import pyarrow.parquet as pq

from feature_store.schemas import SCENES, TRUTH, conform
from feature_store.store import Store
from frame_dist.config import Config


def prepare_world(cfg: Config, store: Store) -> Config:
    """Generate (or reuse) the synthetic world; commit its truth tables; return the ingest config.

    The returned config has ``ingest.interactions`` / ``ingest.videos`` set to the world's files.
    The ``truth`` table (true full-watch probability of every interaction, for the oracle AUC)
    and the ``scenes`` table (topic timeline of every video, for the case study) are committed
    to the store when the world changed.
    """
    from frame_dist.ingest.synthetic import generate_world

    info = generate_world(cfg.world)
    meta = {"world": info.meta_json.read_text()}
    for name, path, schema in (("truth", info.truth_parquet, TRUTH),
                               ("scenes", info.scenes_parquet, SCENES)):
        table = store.table(name)
        if table.exists() and table.metadata().get("world") == meta["world"]:
            continue
        data = pq.read_table(path)
        table.write(conform(data, schema, name), meta, config=cfg)
    cfg.ingest.interactions = str(info.interactions_csv)
    cfg.ingest.videos = str(info.videos_csv)
    return cfg


def from_world(config: dict[str, Any]) -> bool:
    """Whether a resolved config (``Config.to_dict()``) ingests the synthetic world: no
    interactions file, or the world's own files, as :func:`prepare_world` sets them.

    The world's files are absolute paths from the driver's working directory; a relative
    ``world.out_dir`` is matched as their suffix (a Ray worker runs elsewhere).
    """
    from frame_dist.ingest.synthetic import INTERACTIONS_CSV, VIDEOS_CSV

    ingest = config["ingest"]
    if not ingest["interactions"]:
        return True
    out_dir = os.path.normpath(str(config["world"]["out_dir"]).removeprefix("file://"))
    for got, name in ((ingest["interactions"], INTERACTIONS_CSV), (ingest["videos"], VIDEOS_CSV)):
        got, want = os.path.normpath(str(got)), os.path.join(out_dir, name)
        if not (got == want or (not os.path.isabs(want) and got.endswith(os.sep + want))):
            return False
    return True
