"""jobs.ingest end to end on a tiny synthetic world: generate, ingest, skip when unchanged."""

import pyarrow.compute as pc
import pytest

from feature_store.store import Store
from jobs import ingest as ingest_job

TINY = ["world.preset=custom", "world.n_users=10", "world.n_videos=6",
        "world.interactions_per_user=6", "world.min_duration_s=1", "world.max_duration_s=2"]


def test_world_ingest_and_skip(tmp_path, capsys):
    args = [f"store.root={tmp_path}/store", f"world.out_dir={tmp_path}/world", *TINY]
    assert ingest_job.main(args) == 0
    out = capsys.readouterr().out
    assert "ingest: " in out and "0 rows quarantined" in out
    store = Store(f"{tmp_path}/store")
    inter = store.table("interactions").read()
    truth = store.table("truth").read()
    assert inter.num_rows == truth.num_rows > 0
    assert set(pc.unique(inter.column("split")).to_pylist()) == {"train", "valid", "test"}
    assert store.table("videos").read().num_rows == 6
    assert store.table("scenes").read().num_rows >= 6
    # the resolved config is written beside the table
    assert "n_videos: 6" in (tmp_path / "store/tables/interactions/config.yaml").read_text()
    version = store.table("interactions").manifest()["version"]

    assert ingest_job.main(args) == 0
    assert "ingest: skipped" in capsys.readouterr().out
    assert store.table("interactions").manifest()["version"] == version

    # a changed ingest setting re-ingests
    assert ingest_job.main([*args, "ingest.test_fraction=0.5"]) == 0
    assert store.table("interactions").manifest()["version"] == version + 1


def test_bad_config_exit_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ingest_job.main([f"store.root={tmp_path}/s", "graph.n_clips=5"])
    assert exc.value.code == 2
    assert "graph.n_clips=5 must divide extract.grid_size=64" in capsys.readouterr().err
