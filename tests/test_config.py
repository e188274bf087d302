import pytest
import yaml

from frame_dist.config import Config, ConfigError, load_config, parse_override


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.model.dim == 128 and cfg.model.hidden == 256
    assert (cfg.model.a_pos, cfg.model.a_neg) == (1.0, 0.2)
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 1024
    assert cfg.extract.image_size == 224 and cfg.extract.grid_size == 64
    assert cfg.evaluate.ks == (3, 5)


def test_yaml_and_overrides_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "graph": {"n_clips": 8, "n_shards": 2},
        "train": {"lr": "1e-4", "workers": 2},
        "extract": {"grid_size": 32},
    }))
    cfg = load_config(path, ["graph.n_clips=16", "model.use_negative=false",
                             "evaluate.ks=[1, 10]", "store.root=s3://bucket/prefix"])
    assert cfg.graph.n_clips == 16  # override beats the file
    assert cfg.graph.n_shards == 2 and cfg.train.workers == 2
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as text; coerced to float
    assert cfg.model.use_negative is False
    assert cfg.evaluate.ks == (1, 10)
    assert cfg.store.root == "s3://bucket/prefix"

    resolved = tmp_path / "resolved.yaml"
    cfg.save(resolved)
    again = load_config(resolved)
    assert again == cfg


def test_world_preset_sets_sizes_unless_given():
    medium = load_config(None, ["world.preset=medium"])
    assert (medium.world.n_users, medium.world.n_videos) == (3000, 400)
    pinned = load_config(None, ["world.preset=medium", "world.n_users=10"])
    assert pinned.world.n_users == 10 and pinned.world.n_videos == 400
    # the paper's data sets: users, videos and interactions (mean views per user x users)
    for preset, (users, videos, rows) in {"micro-video-a": (12739, 58291, 342694),
                                          "micro-video-b": (22049, 61903, 2111566)}.items():
        world = load_config(None, [f"world.preset={preset}"]).world
        assert (world.n_users, world.n_videos) == (users, videos)
        assert world.n_users * world.interactions_per_user == pytest.approx(rows, rel=0.01)


@pytest.mark.parametrize("override, message", [
    ("graph.n_clips=5", "graph.n_clips=5 must divide extract.grid_size=64"),
    ("graph.n_clips=0", "graph.n_clips=0 must be > 0"),
    ("model.a_neg=-0.2", "model.a_neg=-0.2 must be > 0"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.zero_stage=3", "train.zero_stage=3 must be 0, 1 or 2"),
    ("train.workers=4", "train.workers=4 exceeds graph.n_shards=1"),
    ("ingest.bad_rows=drop", "ingest.bad_rows='drop' must be one of ['fail', 'quarantine']"),
    ("train.precision=fp16", "train.precision='fp16' must be one of ['auto', 'fp32', 'bf16']"),
    ("train.epochs=ten", "train.epochs must be an integer, got 'ten'"),
    ("model.enhance=maybe", "model.enhance must be true or false, got 'maybe'"),
    ("graph.nclips=4", "unknown field graph.nclips"),
    ("world.sizes=[[63, 64]]", "world.sizes entry [63, 64] must be (width, height), even"),
    ("ingest.max_watch_ratio=0.5", "ingest.max_watch_ratio=0.5 must be >= 1"),
])
def test_invalid_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["graph.n_clips=5", "model.dim=0"])
    assert "graph.n_clips=5" in str(err.value) and "model.dim=0" in str(err.value)


def test_bad_override_syntax_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        parse_override("graph.n_clips")
    bad = tmp_path / "bad.yaml"
    bad.write_text("graph: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_validate_checks_values_set_in_code():
    cfg = Config()
    cfg.graph.n_clips = "4"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="graph.n_clips must be an integer"):
        cfg.validate()


def test_trainable_clip_features_need_visual_features():
    with pytest.raises(ConfigError, match="model.trainable_clip_features=true needs "
                                          "model.use_visual=true"):
        load_config(None, ["model.trainable_clip_features=true", "model.use_visual=false"])
    assert load_config(None, ["model.trainable_clip_features=true"]).model.use_visual


def test_precision_defaults_to_auto_and_takes_bf16():
    assert load_config().train.precision == "auto"  # bf16 on CUDA, fp32 on CPU
    assert load_config(None, ["train.precision=bf16"]).train.precision == "bf16"


@pytest.mark.parametrize("override", [
    "train.run_name=..", "train.run_name=.", "train.run_name=a/b", "train.run_name=.hidden",
    "train.run_name=", "train.run_name=a b", r"train.run_name=a\b", "sweep.name=..",
    "sweep.name=../x", "train.run_name=" + "x" * 129,
])
def test_names_that_would_leave_their_folder_are_refused(override):
    field, value = override.split("=", 1)
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert (f"{field}={value!r} must be a name of 1-128 letters, digits, '.', '_' or '-' "
            "starting with a letter or digit") in str(err.value)


def test_safe_names_are_accepted():
    cfg = load_config(None, ["train.run_name=frame_nc8-v1.2", "sweep.name=Sweep_2"])
    assert (cfg.train.run_name, cfg.sweep.name) == ("frame_nc8-v1.2", "Sweep_2")
    assert load_config().sweep.name == ""  # empty: the run name


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "train.l2=-inf",
                                      "ingest.max_watch_ratio=.inf", "model.a_neg=NaN"])
def test_non_finite_numbers_are_refused(override):
    field, value = override.split("=", 1)
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{field} must be a finite number, got" in str(err.value)


def test_a_job_exits_2_on_a_bad_name(capsys):
    from jobs import train as train_job

    with pytest.raises(SystemExit) as exited:
        train_job.main(["train.run_name=.."])
    assert exited.value.code == 2
    assert "train.run_name='..' must be a name" in capsys.readouterr().err


def test_model_presets_set_their_keys_unless_given():
    ours = load_config()
    assert ours.model.preset == "frame-dist"
    assert (ours.model.aggregation, ours.train.position_weights, ours.graph.positives,
            ours.graph.normalisation) == ("survival", True, "watched_clips", "user_mean")
    paper = load_config(None, ["model.preset=paper"])
    assert (paper.model.aggregation, paper.train.position_weights, paper.graph.positives,
            paper.graph.normalisation) == ("mean", True, "full_watch", "symmetric")
    mixed = load_config(None, ["model.preset=paper", "graph.positives=watched_clips"])
    assert (mixed.model.aggregation, mixed.graph.positives) == ("mean", "watched_clips")
    with pytest.raises(ConfigError, match="model.preset='authors' must be one of"):
        load_config(None, ["model.preset=authors"])
