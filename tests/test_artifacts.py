"""The run's files (frame_dist.train.artifacts): each written and read back by its one writer and
reader, in the run's folder (``run_dir``), in the formats other code and people read."""

from __future__ import annotations

import math
import shlex

import numpy as np
import pytest
import torch
import yaml

from feature_store.store import Store, StoreError
from frame_dist.config import ModelConfig, load_config
from frame_dist.model.calibration import Calibration, CalibrationError
from frame_dist.train.artifacts import (
    Checkpoint,
    ModelCard,
    RunClaim,
    RunMetrics,
    SavedModel,
    TrainState,
    run_dir,
    run_path,
)
from frame_dist.train.ray_loop import write_outputs
from frame_dist.train.trainer import build_model

METRICS_KEYS = {"test", "best_epoch", "valid", "global_step", "epochs_run", "resumed_at_steps",
                "history", "n_clips", "workers", "fingerprint", "calibration"}


def test_run_dir_is_the_folder_of_every_file() -> None:
    assert run_dir("frame") == "runs/frame"
    assert run_path("frame", "model.pt") == "runs/frame/model.pt"


def test_write_outputs_model_pt_and_metrics_json(tmp_path) -> None:
    cfg = load_config(None, [f"store.root={tmp_path}/store", "train.run_name=r1",
                             "graph.n_clips=4", "model.dim=8", "model.hidden=16"])
    store = Store.from_config(cfg.store)
    model = build_model(ModelConfig(dim=8, hidden=16), 6, seed=0)
    history = [{"epoch": 1, "loss": 1.0, "valid": {"auc": 0.6}},
               {"epoch": 2, "loss": 0.9, "valid": {"auc": 0.7}}]
    state = TrainState(epoch=3, global_step=10, best_auc=0.7, best_epoch=2, history=history,
                       resumes=[4], fingerprint="f1", done=True)
    write_outputs(cfg, store, model, state, {"auc": 0.65})

    # model.pt: plain tensors and dicts (weights_only=True), rebuilt from the file alone
    raw = torch.load(store.path(run_path("r1", "model.pt")), weights_only=True)
    assert set(raw) == {"model_args", "state_dict", "config", "calibration"}
    assert raw["calibration"] == {"a": 1.0, "b": 0.0}  # none given: the identity
    saved = SavedModel.read(store, "r1")
    assert saved.n_clips == 4 and saved.config["train"]["run_name"] == "r1"
    assert len(saved.sha256) == 64
    rebuilt = saved.build()
    assert not rebuilt.training
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key

    # metrics.json: the keys the report, the tests and people read
    data = store.read_json(run_path("r1", "metrics.json"))
    assert set(data) == METRICS_KEYS
    assert data["valid"] == {"auc": 0.7} and data["epochs_run"] == 2
    assert data["resumed_at_steps"] == [4] and data["fingerprint"] == "f1"
    assert RunMetrics.read(store, "r1") == RunMetrics.from_dict(data)
    assert RunMetrics.read(store, "other") is None
    assert store.exists(run_path("r1", "config.yaml"))


def test_model_card_beside_model_pt(tmp_path) -> None:
    """The train stage's card: a YAML header (yaml.safe_load) with the model, N_c, the data
    fingerprint and metrics; what the run did not measure says so; the command trains it again."""
    overrides = [f"store.root={tmp_path}/my store", "train.run_name=r1", "graph.n_clips=4",
                 "model.dim=8", "model.hidden=16", "train.lr=5e-4", "evaluate.ks=[3, 10]",
                 "ingest.columns={user_id: uid}", "ingest.interactions=007.csv"]
    cfg = load_config(None, overrides)
    store = Store.from_config(cfg.store)
    state = TrainState(epoch=2, global_step=3, best_auc=0.7, best_epoch=1, fingerprint="f1",
                       history=[{"epoch": 1, "valid": {"auc": 0.7}}], done=True)
    write_outputs(cfg, store, build_model(cfg.model, 6, seed=0), state,
                  {"auc": 0.65, "logloss": 0.6})
    text = store.read_bytes(run_path("r1", ModelCard.FILE)).decode()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("\n---\n")[0].removeprefix("---\n"))
    assert header == ModelCard.parse_header(text) == ModelCard.read_header(store, "r1")
    assert header["model_name"] == "FRAME" and header["run_name"] == "r1"
    assert header["n_clips"] == 4
    assert header["data_fingerprint"] == "unknown"  # no graph committed in this store
    assert header["run_fingerprint"] == "f1"
    assert header["model_config"] == cfg.to_dict()["model"]
    assert header["metrics"]["model"] == {"auc": 0.65, "logloss": 0.6}
    assert header["metrics"]["oracle"] == header["metrics"]["baselines"] == "not measured"
    assert "| model | 0.6500 | 0.6000 |" in text
    assert "| oracle | not measured (the evaluate stage has not run yet) |" in text
    # the reproducing command: only what differs from the defaults, and it loads back equal
    command = shlex.split(header["reproduce"])
    assert command[:3] == ["python", "-m", "jobs.pipeline"]
    assert "train.lr=0.0005" in command and "model.dim=8" in command
    assert not [a for a in command if a.startswith(("train.epochs=", "extract."))]
    assert load_config(None, command[3:]).to_dict() == cfg.to_dict()
    config_file = store.uri(run_path("r1", "config.yaml"))
    assert f"python -m jobs.pipeline --config '{config_file}'" in text
    assert load_config(config_file).to_dict() == cfg.to_dict()


def test_model_card_without_metrics_says_not_measured(tmp_path) -> None:
    cfg = load_config(None, [f"store.root={tmp_path}", "train.run_name=r2"])
    card = ModelCard("r2", cfg.to_dict(), "g1", metrics=None)
    header = ModelCard.parse_header(card.render())
    assert header["data_fingerprint"] == "g1"
    assert header["metrics"] == {"source": "not measured", "model": "not measured",
                                 "oracle": "not measured", "baselines": "not measured"}
    evaluated = ModelCard("r2", cfg.to_dict(), "g1", None,
                          {"model": {"auc": np.float64(0.6), "n": np.int64(9)}})
    header = ModelCard.parse_header(evaluated.render())
    assert header["metrics"]["model"] == {"auc": 0.6, "n": 9}
    assert header["metrics"]["oracle"] == "not measured"  # evaluated data without a truth
    assert "ingest.truth_column" in evaluated.render()
    with pytest.raises(StoreError, match="no YAML header"):
        ModelCard.parse_header("# no header\n")


def test_missing_model_says_what_to_run(tmp_path) -> None:
    with pytest.raises(StoreError, match=r"no trained model at .*runs/none/model.pt: run the "
                                         r"train stage first \(train.run_name=none\)"):
        SavedModel.read(Store(str(tmp_path)), "none")


def test_run_claim_round_trip(tmp_path) -> None:
    store = Store(str(tmp_path))
    assert RunClaim.read(store, "r") is None
    RunClaim("abc", {"train": {"lr": 0.1}}).write(store, "r")
    assert store.read_json(run_path("r", "run.json")) == {"fingerprint": "abc",
                                                          "config": {"train": {"lr": 0.1}}}
    assert RunClaim.read(store, "r") == RunClaim("abc", {"train": {"lr": 0.1}})


def test_checkpoint_contents_round_trip(tmp_path) -> None:
    state = TrainState(epoch=2, step=3, global_step=7, best_auc=0.8, best_epoch=1,
                       history=[{"epoch": 1}], fingerprint="f")
    weights = {"w": torch.arange(4.0)}
    checkpoint = Checkpoint(state, weights)
    checkpoint.write_weights(str(tmp_path))
    back = Checkpoint.read(str(tmp_path), checkpoint.client_state())
    assert back.state == state and torch.equal(back.best_weights["w"], weights["w"])
    with pytest.raises(RuntimeError, match="holds no training state; refusing to restart"):
        Checkpoint.read(str(tmp_path), {})
    # the client state of checkpoints written before the loop was shared (no stopped_early,
    # best AUC -1.0) still resumes
    older = {"epoch": 2, "step": 0, "global_step": 4, "best_auc": -1.0, "best_epoch": 1,
             "stale": 0, "done": False, "history": [], "resumes": [], "fingerprint": "f"}
    assert TrainState.from_dict(older).best_auc == -1.0
    assert TrainState().best_auc == -math.inf and TrainState().best_valid == {}


def test_calibration_is_stored_with_the_model_and_read_back(tmp_path) -> None:
    """model.pt, metrics.json and the card carry the calibration; files from before it read as
    the identity; a bad stored value is refused, naming the file."""
    cfg = load_config(None, [f"store.root={tmp_path}/store", "train.run_name=r1",
                             "graph.n_clips=4", "model.dim=8", "model.hidden=16"])
    store = Store.from_config(cfg.store)
    model = build_model(cfg.model, 6, seed=0)
    state = TrainState(epoch=2, global_step=3, best_auc=0.7, best_epoch=1, fingerprint="f1",
                       history=[{"epoch": 1, "valid": {"auc": 0.7, "logloss": 0.9}}], done=True)
    cal = Calibration(0.4, -0.3)
    valid = {"auc": 0.7, "logloss": 0.6, "logloss_raw": 0.9}
    write_outputs(cfg, store, model, state, {"auc": 0.65, "logloss": 0.5}, cal, valid)
    raw = torch.load(store.path(run_path("r1", "model.pt")), weights_only=True)
    assert raw["calibration"] == {"a": 0.4, "b": -0.3}
    assert SavedModel.read(store, "r1").calibration == cal
    data = store.read_json(run_path("r1", "metrics.json"))
    assert data["calibration"] == {"a": 0.4, "b": -0.3} and data["valid"] == valid
    assert RunMetrics.read(store, "r1").calibration == cal
    header = ModelCard.read_header(store, "r1")
    assert header["calibration"] == {"a": 0.4, "b": -0.3}
    text = store.read_bytes(run_path("r1", ModelCard.FILE)).decode()
    assert "P(full watch) = sigmoid(a y + b) of the model's logit y, a = 0.4, b = -0.3" in text

    # files written before calibration existed: the identity
    del raw["calibration"]
    torch.save(raw, store.path(run_path("r1", "model.pt")))
    assert SavedModel.read(store, "r1").calibration == Calibration()
    del data["calibration"]
    assert RunMetrics.from_dict(data).calibration == Calibration()
    # a stored value that is no calibration: refused, naming the file
    raw["calibration"] = {"a": -2.0, "b": 0.0}
    torch.save(raw, store.path(run_path("r1", "model.pt")))
    with pytest.raises(CalibrationError, match=r"runs/r1/model.pt: calibration: a=-2.0 must "
                                               r"be > 0"):
        SavedModel.read(store, "r1")
    with pytest.raises(CalibrationError, match=r"metrics.json: calibration: b=nan must be"):
        RunMetrics.from_dict({**data, "calibration": {"a": 1.0, "b": float("nan")}})


def test_reproduce_a_synthetic_world_run_with_the_world_not_its_files(tiny_ingest, tmp_path):
    """jobs.pipeline points ingest at the world's generated files (prepare_world); the card's
    command names the world (preset, seed) instead, so pasting it generates the same world."""
    from frame_dist.ingest.world import prepare_world

    _, _, overrides = tiny_ingest
    cfg = load_config(None, [*overrides, f"store.root={tmp_path}/store", "train.run_name=r3"])
    store = Store.from_config(cfg.store)
    prepare_world(cfg, store)  # as the pipeline's ingest step: the world's files in the config
    assert cfg.ingest.interactions.endswith("/interactions.csv") and cfg.ingest.videos
    state = TrainState(epoch=2, best_epoch=1, history=[{"epoch": 1, "valid": {"auc": 0.7}}])
    write_outputs(cfg, store, build_model(cfg.model, 6, seed=0), state, {"auc": 0.6})
    text = store.read_bytes(run_path("r3", ModelCard.FILE)).decode()
    command = shlex.split(ModelCard.parse_header(text)["reproduce"])
    assert not [a for a in command if a.startswith("ingest.")], command
    assert "world.preset=custom" in command and "world.seed=0" in command
    again = load_config(None, command[3:])
    assert again.ingest.interactions == again.ingest.videos == ""
    prepare_world(again, store)  # the same world, the same files
    assert again.to_dict() == cfg.to_dict()
    assert "- interactions: the synthetic world (preset custom, seed 0)" in text


def test_reproduce_user_data_keeps_its_paths() -> None:
    from frame_dist.ingest.world import from_world
    from frame_dist.train.artifacts import reproduce_command

    cfg = load_config(None, ["ingest.interactions=/data/interactions.csv",
                             "ingest.videos=/data/videos.csv", "tracking.experiment=mine"])
    command = shlex.split(reproduce_command(cfg.to_dict()))
    assert "ingest.interactions=/data/interactions.csv" in command
    assert "ingest.videos=/data/videos.csv" in command
    assert not [a for a in command if a.startswith(("world.", "tracking."))]
    # a relative world.out_dir matches the absolute paths the driver resolved it to
    world = cfg.to_dict()
    world["ingest"] = {"interactions": "/home/u/out/world/interactions.csv",
                       "videos": "/home/u/out/world/videos.csv"}
    assert world["world"]["out_dir"] == "out/world" and from_world(world)
    world["ingest"]["videos"] = "/home/u/elsewhere/videos.csv"
    assert not from_world(world)
