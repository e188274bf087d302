"""The N_c sweep (jobs/sweep.py, frame_dist/evaluate/sweep.py) on a tiny synthetic world.

The module's store is a copy of the session's ``tiny_ingest`` (tests/conftest.py: the tiny
world, real ingest), then frame features of every video on the 8-frame grid, committed as this
config's encoder would commit them (the topic features of tests/worlds.py: extraction itself is
tested in tests/test_extract.py and costs this test's budget). ``jobs.sweep`` over N_c = 1, 2,
4 must reuse them: its extract step decodes no video and the ``frame_features`` table (manifest,
config and part files) is byte-identical afterwards. Each N_c trains its own Ray Train run (one
worker, one epoch) and is evaluated; the table's numbers are each run's evaluation.json. A rerun
skips every committed stage.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
from worlds import copy_store, write_topic_features  # tests/ is on sys.path (pytest)

from frame_dist.extract.encoder import encoder_identity
from frame_dist.train.artifacts import run_path
from jobs import sweep as sweep_job

N_CLIPS = [1, 2, 4]
RUN = "sw"
TINY = ["world.preset=custom", "world.n_users=24", "world.n_videos=10",
        "world.interactions_per_user=12", "world.min_duration_s=1", "world.max_duration_s=2",
        "extract.grid_size=8", "extract.image_size=32", "extract.weights=random",
        "extract.batch_size=32", "graph.n_shards=1", "model.dim=16", "model.hidden=32",
        "train.batch_size=64", "train.epochs=1", "train.workers=1", "train.seed=7",
        f"train.run_name={RUN}", f"sweep.n_clips={N_CLIPS}"]
PNG = b"\x89PNG\r\n\x1a\n"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def swept(ray_local, tiny_ingest, tmp_path_factory):
    world_cfg, ingested, _ = tiny_ingest  # the same world.* settings as TINY
    world = f"world.out_dir={world_cfg.world.out_dir}"
    cfg, store, overrides = copy_store(ingested, [*TINY, world],
                                       tmp_path_factory.mktemp("sweep") / "store")
    # the features, as this config's encoder commits them
    write_topic_features(store, identity=encoder_identity(cfg.extract))
    features = Path(store.path("tables", "frame_features"))
    before = _files(features)
    assert sweep_job.main(overrides) == 0
    return store, overrides, before, _files(features)


@pytest.mark.slow
def test_sweep_reuses_one_extraction(swept):
    store, _, before, after = swept
    assert after == before and any(name.startswith("parts/") for name in before)
    extract = store.read_json(f"sweeps/{RUN}/sweep.json")["extract"]
    assert extract["done"] == 0 and extract["frames"] == 0
    assert extract["skipped"] == 10 and extract["failed"] == 0


@pytest.mark.slow
def test_sweep_table_equals_each_runs_evaluation(swept):
    store, _, _, _ = swept
    summary = store.read_json(f"sweeps/{RUN}/sweep.json")
    assert summary["n_clips"] == N_CLIPS
    rows = summary["rows"]
    assert [r["n_clips"] for r in rows] == N_CLIPS
    markdown = store.read_bytes(f"sweeps/{RUN}/sweep.md").decode()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    names = [c.strip() for c in table[0].strip("|").split("|")][2:]
    assert len(table) == 2 + len(N_CLIPS) + 1  # header, rule, one row per N_c, the oracle
    csv_rows = list(csv.DictReader(io.StringIO(store.read_bytes(
        f"sweeps/{RUN}/sweep.csv").decode())))
    assert [r["run"] for r in csv_rows] == [f"{RUN}_nc{n}" for n in N_CLIPS] + ["oracle"]
    for n, row, line, csv_row in zip(N_CLIPS, rows, table[2:], csv_rows):
        run = f"{RUN}_nc{n}"
        evaluation = store.read_json(run_path(run, "evaluation.json"))
        metrics = store.read_json(run_path(run, "metrics.json"))  # the run trained with this N_c
        assert metrics["n_clips"] == n and evaluation["n_clips"] == n and row["run"] == run
        assert row["model"] == evaluation["model"] and row["oracle"] == evaluation["oracle"]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [str(n), run]
        for name, cell in zip(names, cells[2:]):
            assert cell == f"{evaluation['model'][name]:.4f}"
            assert float(csv_row[name]) == evaluation["model"][name]
        for k in ("auc", "logloss", "recall@3", "ndcg@3"):
            assert math.isfinite(evaluation["model"][k])
        assert store.exists(run_path(run, "report.md"))
    oracle = store.read_json(run_path(f"{RUN}_nc1", "evaluation.json"))["oracle"]
    assert table[-1].startswith("| oracle | | " + f"{oracle['auc']:.4f} |")
    png = store.read_bytes(f"sweeps/{RUN}/metrics_by_n_clips.png")
    assert png.startswith(PNG) and png[12:16] == b"IHDR"
    # the last run's report plots every run of the sweep (same data)
    report = store.read_bytes(run_path(f"{RUN}_nc4", "report.md")).decode()
    assert "same data (3 run(s))" in report


@pytest.mark.slow
def test_rerun_skips_committed_stages(swept, capsys):
    store, overrides, _, _ = swept
    models = {n: store.read_bytes(run_path(f"{RUN}_nc{n}", "model.pt")) for n in N_CLIPS}
    errors = Path(store.path("tables", "extract_errors"))
    errors_before = _files(errors)
    assert sweep_job.main(overrides) == 0
    assert _files(errors) == errors_before  # nothing to extract: no new commit of the errors
    out = capsys.readouterr().out
    assert out.count("train: skipped") == len(N_CLIPS)
    assert out.count("graph N_c=") == out.count(": skipped (inputs and settings unchanged)")
    assert "0 video(s) decoded by this sweep" in out
    assert all(store.read_bytes(run_path(f"{RUN}_nc{n}", "model.pt")) == models[n] for n in N_CLIPS)
    assert out.rstrip().splitlines()[-1].startswith("plot: ")


def test_n_clips_that_do_not_divide_the_grid_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        sweep_job.main([*TINY, f"store.root={tmp_path}/store", "sweep.n_clips=[1, 3, 4, 6]"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "sweep.n_clips=[1, 3, 4, 6]: [3, 6] must divide extract.grid_size=8" in err
    assert "divisors: [1, 2, 4, 8]" in err
    assert not (tmp_path / "store").exists()  # refused before anything ran
