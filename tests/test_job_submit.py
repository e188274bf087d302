"""``ray job submit`` of the pipeline to a real, token-authenticated Ray head on 127.0.0.1.

One head for the module (tests/ray_head.py): its own temp dir and ports, 2 CPUs, dashboard on
127.0.0.1, ``RAY_AUTH_MODE=token`` with a token from ``ray get-auth-token --generate``; it is
stopped at the end and none of its processes may be left.

- the dashboard refuses requests without the token or with another one; the CLI without the
  token cannot talk to the head; a job's ``python`` is the interpreter of this environment;
- ``jobs.pipeline`` submitted the way docs/cluster.md says (``--runtime-env
  cluster/runtime_env.yaml --working-dir .``) on a tiny world SUCCEEDS, every stage of
  ``jobs.pipeline.stages`` reports done, and each stage's outputs are committed in the store
  (``check_stage_outputs``): ingest (videos, interactions), extract (frame_features: every
  video on the whole grid), graph (the shards of N_c), train (model, metrics), evaluate
  (evaluation.json, report.md and its plots), score (the ``scores`` table: top_k ranked rows
  per user). A stage without checks there must still report done;
- a job with an invalid config (``graph.n_clips=5``) ends FAILED with exit code 2, and its
  ``ray job logs`` give the cause.

- the log ends with the metrics table and the path of the run report.

Not covered here: train with train.workers=2 / graph.n_shards=2 (tests/test_train_loop.py runs
W = 2 on a local instance; a 2-worker run does not fit this test's 2-core budget next to a head).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest
from ray_head import RayHead, start_ray_head  # tests/ is on sys.path under pytest

from feature_store.store import Store
from frame_dist.config import Config, load_config
from frame_dist.graph.shards import read_graph_manifest
from frame_dist.train.artifacts import run_dir

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# The tiniest world that still exercises every stage (frame_dist/config.py): 8 users, 6 videos
# of 1-2 s, a 4-frame grid at 32 px (ResNet-50's minimum), 2 clips per video.
TINY = ["world.preset=custom", "world.n_users=8", "world.n_videos=6",
        "world.interactions_per_user=5", "world.min_duration_s=1", "world.max_duration_s=2",
        "extract.grid_size=4", "extract.image_size=32", "extract.batch_size=8",
        "graph.n_clips=2", "train.epochs=1"]
# Committed tables each stage must leave in the store (more checks in check_stage_outputs).
STAGE_TABLES = {
    "ingest": ["videos", "interactions"],
    "extract": ["frame_features"],
}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> RayHead:
    # Ray's unix sockets live about 70 bytes below the base and may not exceed 107 bytes
    base = tmp_path_factory.mktemp("rh")
    own_base = len(str(base)) > 36
    if own_base:
        base = Path(tempfile.mkdtemp(prefix="fdrh", dir="/tmp"))
    head = start_ray_head(base, num_cpus=2)
    try:
        yield head
    finally:
        left = head.stop()
        if own_base:
            shutil.rmtree(base, ignore_errors=True)
        assert left == [], f"processes of the test head still alive: {left}"


def submit(head: RayHead, entrypoint: list[str], *, timeout: float = 240) -> tuple[str, dict]:
    """Submit from the repository root as docs/cluster.md does; wait; return (id, job info)."""
    submission_id = f"frame-dist-test-{uuid.uuid4().hex[:8]}"
    done = head.ray("job", "submit", "--address", head.dashboard_url,
                    "--submission-id", submission_id,
                    "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".",
                    "--", *entrypoint, cwd=REPO, timeout=timeout)
    status, body = head.http_get(f"/api/jobs/{submission_id}", head.token)
    assert status == 200, f"job {submission_id} unknown to the head ({status}): {body}\n" \
                          f"submit output:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    info = json.loads(body)
    # without --no-wait the CLI follows the job and reports its end in its exit code
    assert (done.returncode == 0) == (info["status"] == "SUCCEEDED"), done.stderr[-2000:]
    return submission_id, info


def job_logs(head: RayHead, submission_id: str) -> str:
    done = head.ray("job", "logs", "--address", head.dashboard_url, submission_id, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_token_is_required_and_jobs_use_this_python(ray_head, tmp_path):
    assert ray_head.http_get("/api/jobs/")[0] == 401
    assert ray_head.http_get("/api/jobs/", "0" * 64)[0] == 403
    assert ray_head.http_get("/api/jobs/", ray_head.token)[0] == 200

    # the CLI without the token (and no ~/.ray/auth_token), then with another one: the head
    # refuses both (the messages are the dashboard's 401 and 403 answers)
    (tmp_path / "home").mkdir()
    base = {k: v for k, v in ray_head.env.items()
            if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    base["HOME"] = str(tmp_path / "home")
    for env, refusal in [(base, "Missing authentication token"),
                         ({**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                          "Invalid authentication token")]:
        done = ray_head.ray("job", "list", "--address", ray_head.dashboard_url, env=env,
                            timeout=60)
        assert done.returncode != 0
        assert refusal in done.stderr, done.stderr[-2000:]
    assert ray_head.ray("job", "list", "--address", ray_head.dashboard_url,
                        timeout=60).returncode == 0

    submission_id, info = submit(ray_head, ["python", "-c",
                                            "import sys; print('python:', sys.executable)"])
    assert info["status"] == "SUCCEEDED", info
    logs = job_logs(ray_head, submission_id)
    executable = next(line.split(": ", 1)[1] for line in logs.splitlines()
                      if line.startswith("python: "))
    assert Path(executable).parent == Path(sys.executable).parent, logs


def check_stage_outputs(stage: str, store: Store, cfg: Config) -> None:
    """What ``stage`` must have committed to ``store`` for the tiny world of ``cfg``.

    A stage not named here is only required to report done.
    """
    for table in STAGE_TABLES.get(stage, []):
        assert store.table(table).manifest() is not None, f"stage {stage}: {table} not committed"
        assert store.exists("tables", table, "_manifest.json")
    run = run_dir(cfg.train.run_name)
    if stage == "ingest":
        video_ids = set(store.table("videos").read().column("video_id").to_pylist())
        assert len(video_ids) == cfg.world.n_videos
        inter = store.table("interactions").read(columns=["user_id", "video_id"])
        assert inter.num_rows > 0
        assert set(pc.unique(inter.column("video_id")).to_pylist()) <= video_ids
        assert len(pc.unique(inter.column("user_id"))) <= cfg.world.n_users
    elif stage == "extract":
        video_ids = set(store.table("videos").read().column("video_id").to_pylist())
        features = store.table("frame_features").read(columns=["video_id", "grid_index"])
        assert features.num_rows == len(video_ids) * cfg.extract.grid_size
        assert set(features.column("video_id").to_pylist()) == video_ids
        assert set(features.column("grid_index").to_pylist()) == set(range(cfg.extract.grid_size))
    elif stage == "graph":
        graph_dir = f"graphs/nc={cfg.graph.n_clips}"
        manifest = read_graph_manifest(store, cfg.graph.n_clips)
        assert manifest is not None
        assert manifest.n_clips == cfg.graph.n_clips
        assert manifest.n_videos == cfg.world.n_videos
        assert len(manifest.shards) == len(manifest.files) == cfg.graph.n_shards
        for files in manifest.files:
            for name in files.values():
                assert store.exists(graph_dir, name), f"graph shard file {name} missing"
    elif stage == "train":
        metrics = store.read_json(f"{run}/metrics.json")
        assert 1 <= metrics["epochs_run"] <= cfg.train.epochs
        assert 0 <= metrics["test"]["auc"] <= 1
        assert store.exists(run, "model.pt") and store.exists(run, "config.yaml")
    elif stage == "evaluate":
        evaluation = store.read_json(f"{run}/evaluation.json")
        assert evaluation["n_clips"] == cfg.graph.n_clips
        assert 0 <= evaluation["model"]["auc"] <= 1
        assert set(cfg.evaluate.ks) == {int(k.split("@")[1]) for k in evaluation["model"]
                                        if k.startswith("recall@")}
        report = store.read_bytes(f"{run}/report.md").decode()
        assert f"{evaluation['model']['auc']:.4f}" in report
        for image in re.findall(r"\]\(([^)]+\.png)\)", report):
            assert store.read_bytes(f"{run}/{image}").startswith(b"\x89PNG"), image
    elif stage == "score":
        scores = store.table("scores").read().to_pandas()
        users = store.table("interactions").read(columns=["user_id"]).column("user_id")
        assert set(scores["user_id"]) == set(users.to_pylist())
        ranks = scores.groupby("user_id")["rank"].apply(sorted)
        assert all(r == list(range(1, len(r) + 1)) and len(r) <= cfg.score.top_k for r in ranks)


def test_pipeline_job_succeeds_and_commits_every_stage(ray_head, tmp_path):
    from jobs.pipeline import stages

    overrides = [f"store.root={tmp_path}/store", f"world.out_dir={tmp_path}/world", *TINY]
    cfg = load_config(REPO / "configs/demo.yaml", overrides)
    stage_names = [name for name, _ in stages(cfg)]
    assert stage_names[:2] == ["ingest", "extract"]

    submission_id, info = submit(ray_head, ["python", "-m", "jobs.pipeline", "--config",
                                            "configs/demo.yaml", *overrides])
    logs = job_logs(ray_head, submission_id)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"
    for name in stage_names:
        assert f"== stage {name} done" in logs, f"stage {name} did not report done:\n{logs}"
    assert "pipeline finished" in logs
    tail = logs.rstrip().splitlines()
    assert tail[-1].startswith("report: ") and tail[-1].endswith("report.md"), tail[-8:]
    assert any(line.startswith("| model | ") for line in tail[-6:]), tail[-8:]

    store = Store(f"{tmp_path}/store")
    for name in stage_names:
        check_stage_outputs(name, store, cfg)


def test_invalid_config_job_fails_with_its_cause(ray_head, tmp_path):
    submission_id, info = submit(ray_head, [
        "python", "-m", "jobs.pipeline", "--config", "configs/demo.yaml",
        f"store.root={tmp_path}/store", "graph.n_clips=5"], timeout=120)
    assert info["status"] == "FAILED", info
    assert "exit code 2" in info["message"], info["message"]  # frame_dist.cli.EXIT_CONFIG
    grid = load_config(REPO / "configs/demo.yaml").extract.grid_size
    assert grid % 5, "the demo's grid must not be divisible by 5 for this test"
    logs = job_logs(ray_head, submission_id)
    assert f"graph.n_clips=5 must divide extract.grid_size={grid}" in logs, logs
    assert not (tmp_path / "store").exists(), "a refused config must not write anything"
