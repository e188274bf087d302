"""Typed configuration: one dataclass per stage, YAML files plus ``key.sub=value`` overrides.

Every field carries a comment with its meaning (and the paper's symbol where there is one).
``load_config(path, overrides)`` returns a validated :class:`Config`; ``Config.to_yaml()`` is the
resolved form written beside every output, and loading that file again gives an equal config.

Validation raises :class:`ConfigError` naming the field (``graph.n_clips``) and the reason.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass
class StoreConfig:
    root: str = "out/store"  # feature store root: a local path or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint override (else AWS_ENDPOINT_URL)
    region: str | None = None  # S3 region (else AWS_REGION / AWS_DEFAULT_REGION)
    # Credentials are never part of the config: they come from the standard AWS env vars
    # (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN) or the AWS profile.


@dataclass
class WorldConfig:
    # sizes below are set by the preset; micro-video-a/-b: the paper's datasets' users, videos
    # and interactions (feature-only worlds, frame_dist.ingest.feature_world)
    preset: Literal["small", "medium", "micro-video-a", "micro-video-b", "custom"] = "small"
    seed: int = 0  # everything in the world is a deterministic function of this seed
    out_dir: str = "out/world"  # where the mp4 files and the source tables are written
    n_users: int = 60  # M
    n_videos: int = 40  # N
    n_topics: int = 8  # distinct visual topics (colour + pattern) a scene can show
    interactions_per_user: int = 24  # mean number of videos each simulated user is shown
    min_duration_s: float = 3.0  # video durations are uniform in [min, max]
    max_duration_s: float = 9.0
    fps_choices: tuple[int, ...] = (12, 15, 24, 25)  # each video draws its frame rate from here
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (80, 48), (96, 64))  # (width, height) choices
    min_scenes: int = 2  # each video is a sequence of scenes, one topic each
    max_scenes: int = 5
    base_hazard: float = 0.04  # skip rate per second while a liked scene plays (noise)
    dislike_hazard: float = 1.4  # extra skip rate per second while a disliked scene plays
    taste_sharpness: float = 3.0  # how strongly a user's taste separates topics
    dislike_fraction: float = 0.25  # probability that a user dislikes a given topic
    impatience_sigma: float = 0.5  # log-normal spread of the users' background skip-rate factor


@dataclass
class IngestConfig:
    interactions: str = ""  # CSV or Parquet file of interactions (empty: the synthetic world's)
    videos: str = ""  # CSV or Parquet file of videos (video_id, uri[, duration_s])
    # column-name preset (and the unit of its times): frame_dist/ingest/interactions.PRESETS
    preset: Literal["frame", "authors", "kuairec", "kuairand", "custom"] = "frame"
    columns: dict[str, str] = field(default_factory=dict)  # our name -> source column name
    duration_unit: Literal["s", "ms"] | None = None  # unit of play time and duration (None: preset)
    max_watch_ratio: float = 1.0  # watch ratio r is capped here (replays exceed 1)
    full_watch_tolerance: float = 0.02  # r >= 1 - tolerance counts as a full watch
    test_fraction: float = 0.2  # test = last fraction of each user's interactions (by time)
    valid_fraction: float = 0.1  # validation (early stopping) = the fraction before the test part
    min_user_interactions: int = 5  # users with fewer interactions stay entirely in train
    bad_rows: Literal["fail", "quarantine"] = "fail"  # policy for invalid rows; never silent
    # source column of the true full-watch probability (e.g. p_full, in [0, 1]), where the data
    # carries one: ingest writes the `truth` table from it, so evaluate and the report show the
    # oracle's metrics (empty: none; the synthetic world commits its own truth)
    truth_column: str = ""


@dataclass
class ExtractConfig:
    grid_size: int = 64  # G: frames sampled on a uniform time grid per video
    image_size: int = 224  # encoder input resolution (the paper's 224)
    weights: str = "IMAGENET1K_V2"  # torchvision weights name, a local .pt path, or "random"
    weights_seed: int = 0  # seed of the random initialisation when weights == "random"
    batch_size: int = 64  # frames per encoder batch
    encoder_actors: int = 1  # size of the encoder actor pool
    decode_cpus: float = 1.0  # CPUs reserved by each decoding task
    decoder_threads: int = 1  # PyAV decoder threads per decoding task
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPU actors when the cluster has GPUs
    videos_per_commit: int = 32  # videos written per committed part file
    # (extract stage additions)
    videos_per_decode_task: int = 2  # videos per decoding task; each holds G x S x S x 3 bytes
    seek_min_frames: int = 48  # seek (keyframe, then forward) to a grid time this many frame
    #                            intervals ahead of the decoder; 0: always decode sequentially
    encoder_threads: int = 0  # torch threads per CPU encoder actor (0: node CPUs / encoder_actors)
    # precomputed features (jobs.import_features; docs/extract.md "Bringing precomputed
    # features"): a .npy array (V, G, F) or a Parquet file (video_id + G x F floats per video)
    import_path: str = ""  # empty: no import; set, ingest also accepts videos without a uri
    import_ids: str = ""  # with a .npy file: video ids, one per line, or a Parquet/CSV video_id
    import_name: str = ""  # names the features: identity weights "external:<import_name>"
    # frames: (G, F) grid frames per video; clips: (N_c, F) clip features, stored as a grid of
    # G = N_c frames (graph.n_clips = N_c gives them back exactly)
    import_kind: Literal["frames", "clips"] = "frames"


@dataclass
class GraphConfig:
    n_clips: int = 4  # N_c: equal-duration clips per video
    # R^p: every clip of fully watched videos (paper eq. 2) or every fully played clip of any
    # view (frame-dist's default, model.preset)
    positives: Literal["full_watch", "watched_clips"] = "watched_clips"
    # R~ of eq. 6: "symmetric" D_u^-1/2 R D_c^-1/2 (the paper's GCN) or "user_mean" D_u^-1 R (a
    # user is the mean of its clips: frame-dist's default, model.preset)
    normalisation: Literal["symmetric", "user_mean"] = "user_mean"
    n_shards: int = 1  # user partitions (one per training worker or more)


@dataclass
class ModelConfig:
    # named configuration (MODEL_PRESETS): "frame-dist" (the defaults, docs/model.md section 9)
    # or "paper" (every equation as printed); keys set explicitly win over the preset
    preset: Literal["frame-dist", "paper"] = "frame-dist"
    dim: int = 128  # d: embedding size
    hidden: int = 256  # hidden width of MLP^p and MLP^n
    a_pos: float = 1.0  # a_p: weight of the positive clip score (eq. 12)
    a_neg: float = 0.2  # a_n: weight of the negative clip score (eq. 12)
    use_negative: bool = True  # False: ablation without the negative graph and pair-wise loss
    enhance: bool = True  # False: raw features (no W_t), Table 5's "raw"
    use_visual: bool = True  # False: ablation without visual features (free clip embeddings)
    # learn the (C, F) clip feature table, initialised from the extracted features; every
    # worker holds the whole table, ZeRO stages 1/2 partition its Adam state (and 2 its grads)
    trainable_clip_features: bool = False
    # a video's score from its clip scores: "mean" (eq. 13) or "survival" (P(full watch) =
    # product of the clips' sigmoid(y): no clip skipped; docs/model.md)
    aggregation: Literal["mean", "survival"] = "survival"


Precision = Literal["auto", "fp32", "bf16"]  # train.precision


def bf16_activations(precision: str, device_type: str) -> bool:
    """Whether ``train.precision`` runs the forward under bf16 autocast on ``device_type``
    ("auto": on CUDA only; "bf16": everywhere; "fp32": never). Weights, gradients, Adam state,
    the sparse aggregations and the loss stay fp32 in every case."""
    if precision not in get_args(Precision):
        raise ValueError(f"train.precision={precision!r} must be one of "
                         f"{list(get_args(Precision))}")
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


@dataclass
class TrainConfig:
    run_name: str = "frame"  # checkpoints live under <store>/runs/<run_name>
    epochs: int = 20
    batch_size: int = 1024  # global batch of interactions
    lr: float = 1e-3
    alpha: float = 1.0  # weight of the point-wise loss (eq. 16)
    beta: float = 1.0  # weight of the pair-wise loss (eq. 16)
    l2: float = 1e-5  # lambda: L2 factor (eq. 16)
    position_weights: bool = True  # eq. 14's eps_j = j / N_c on watched clips (False: 1)
    grad_clip: float = 1.0  # gradient norm clipping (0: off)
    seed: int = 0
    workers: int = 1  # W: Ray Train workers
    use_gpu: bool | None = None  # None: GPU when the cluster has one
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    # autocast of the forward pass: auto = bf16 on CUDA, fp32 on CPU; bf16 = bf16 on CPU too
    # (fast with AMX / AVX512-BF16); fp32 = none. Weights, Adam, sparse sums and loss stay fp32
    precision: Precision = "auto"
    patience: int = 3  # early stopping on validation AUC (epochs without improvement)
    checkpoint_every_steps: int = 0  # 0: only at the end of every epoch
    steps_per_epoch: int = 0  # 0: a full pass; else cut epochs short (smoke runs, benchmarks)
    max_failures: int = 2  # Ray Train FailureConfig


@dataclass
class EvaluateConfig:
    ks: tuple[int, ...] = (3, 5)  # K of Recall@K and NDCG@K
    batch_size: int = 8192


@dataclass
class ScoreConfig:
    top_k: int = 10  # K: recommendations per user
    exclude_seen: bool = True  # drop videos the user already interacted with in train
    users_per_chunk: int = 1024  # users per Ray Data row: the unit of work, commit and resume
    candidates: str = ""  # optional table of candidate video ids (default: all videos)
    # fused scoring kernel: eager (plain torch), compiled (torch.compile, CPU), auto (eager on
    # GPUs and for small work, compiled for large CPU work when a C++ compiler is present)
    kernel: Literal["auto", "eager", "compiled"] = "auto"
    videos_per_block: int = 4096  # videos scored between two top-k merges (U x block scores)
    actors: int = 0  # scoring actors (0: one per GPU, else one per CPU; never > chunks to score)
    shard_task_cpus: float = 1.0  # CPUs reserved by each shard's embedding task


@dataclass
class SweepConfig:
    # N_c values of the N_c sweep (jobs.sweep), each a divisor of extract.grid_size (G); each
    # trains its own run <train.run_name>_nc<N_c> on the same frame features. Empty: the powers
    # of two up to 64 that divide G (1 ... 16 on a 16-frame grid; extract G = 64 for 32 and 64)
    n_clips: tuple[int, ...] = ()
    name: str = ""  # the sweep's table and plot go to <store>/sweeps/<name> (empty: run_name)


@dataclass
class PlanConfig:
    # memory one training worker may use, GiB (0: the Ray cluster's memory resource / W when
    # a cluster is connected, else this machine's memory / W); the planner refuses beyond it
    worker_memory_gb: float = 0.0
    gpu_memory_gb: float = 0.0  # GPU memory per worker, GiB (0: the visible GPU's, if any)
    shard_fraction: float = 0.25  # recommend more shards when one shard's graph needs more


@dataclass
class TrackingConfig:
    # MLflow tracking server or store URI (http://host:5000, sqlite:///mlflow.db, databricks);
    # empty: MLFLOW_TRACKING_URI from the environment; both empty: no tracking. Needs the extra
    # `pip install frame-dist[mlflow]`. Credentials go in MLflow's env vars, not here: the
    # resolved config is written beside every output
    mlflow_uri: str = ""
    experiment: str = "frame-dist"  # MLflow experiment (created when missing)
    run_name: str = ""  # MLflow run name (empty: train.run_name)


@dataclass
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        """Check every field and the cross-stage constraints; return self."""
        _check_types(self, "")
        _validate_ranges(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# Preset sizes of the synthetic world; "custom" keeps whatever the config says.
WORLD_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(n_users=60, n_videos=40, interactions_per_user=24),
    "medium": dict(n_users=3000, n_videos=400, interactions_per_user=40),
    # Micro-video-A: 12,739 users, 58,291 videos, 342,694 interactions (27 per user)
    "micro-video-a": dict(n_users=12739, n_videos=58291, interactions_per_user=27),
    # Micro-video-B: 22,049 users, 61,903 videos, 2,111,566 interactions (96 per user)
    "micro-video-b": dict(n_users=22049, n_videos=61903, interactions_per_user=96),
}


# The two named model configurations: the settings each preset fixes (docs/model.md section 9
# has the ablation behind every frame-dist departure from the paper)
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "frame-dist": {"model.aggregation": "survival", "train.position_weights": True,
                   "graph.positives": "watched_clips", "graph.normalisation": "user_mean"},
    "paper": {"model.aggregation": "mean", "train.position_weights": True,
              "graph.positives": "full_watch", "graph.normalisation": "symmetric"},
}


def _positive(errors: list[str], name: str, value: float) -> None:
    if not value > 0:
        errors.append(f"{name}={value!r} must be > 0")


def _non_negative(errors: list[str], name: str, value: float) -> None:
    if not value >= 0:
        errors.append(f"{name}={value!r} must be >= 0")


# Names that become one path component of the store (runs/<run_name>, sweeps/<name>): letters,
# digits, '.', '_' and '-', starting with a letter or digit (so never '.', '..' or hidden)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _name(errors: list[str], name: str, value: str) -> None:
    if not NAME_PATTERN.fullmatch(value):
        errors.append(f"{name}={value!r} must be a name of 1-128 letters, digits, '.', '_' or "
                      "'-' starting with a letter or digit (it names a folder of the store)")


def _validate_ranges(cfg: Config) -> None:
    e: list[str] = []
    w = cfg.world
    for name in ("n_users", "n_videos", "n_topics", "interactions_per_user", "min_scenes"):
        _positive(e, f"world.{name}", getattr(w, name))
    _positive(e, "world.min_duration_s", w.min_duration_s)
    if w.max_duration_s < w.min_duration_s:
        e.append(f"world.max_duration_s={w.max_duration_s} must be >= world.min_duration_s="
                 f"{w.min_duration_s}")
    if w.max_scenes < w.min_scenes:
        e.append(f"world.max_scenes={w.max_scenes} must be >= world.min_scenes={w.min_scenes}")
    if not w.fps_choices or any(f <= 0 for f in w.fps_choices):
        e.append(f"world.fps_choices={list(w.fps_choices)} must be non-empty and positive")
    for wh in w.sizes:
        if len(wh) != 2 or any(s <= 0 or s % 2 for s in wh):
            e.append(f"world.sizes entry {list(wh)} must be (width, height), even and positive "
                     "(H.264 with yuv420p)")
    _non_negative(e, "world.base_hazard", w.base_hazard)
    _non_negative(e, "world.dislike_hazard", w.dislike_hazard)
    _non_negative(e, "world.impatience_sigma", w.impatience_sigma)
    if not 0.0 <= w.dislike_fraction <= 1.0:
        e.append(f"world.dislike_fraction={w.dislike_fraction!r} must lie in [0, 1]")
    i = cfg.ingest
    if not 0 <= i.test_fraction < 1:
        e.append(f"ingest.test_fraction={i.test_fraction} must be in [0, 1)")
    if not 0 <= i.valid_fraction < 1 or i.valid_fraction + i.test_fraction >= 1:
        e.append(f"ingest.valid_fraction={i.valid_fraction} must be in [0, 1) and leave room "
                 f"for train next to ingest.test_fraction={i.test_fraction}")
    _positive(e, "ingest.max_watch_ratio", i.max_watch_ratio)
    if i.max_watch_ratio < 1:
        e.append(f"ingest.max_watch_ratio={i.max_watch_ratio} must be >= 1 (a full watch is r=1)")
    if not 0 <= i.full_watch_tolerance < 0.5:
        e.append(f"ingest.full_watch_tolerance={i.full_watch_tolerance} must be in [0, 0.5)")
    if i.min_user_interactions < 1:
        e.append(f"ingest.min_user_interactions={i.min_user_interactions} must be >= 1")

    x = cfg.extract
    for name in ("grid_size", "image_size", "batch_size", "encoder_actors", "decoder_threads",
                 "videos_per_commit"):
        _positive(e, f"extract.{name}", getattr(x, name))
    _positive(e, "extract.decode_cpus", x.decode_cpus)
    _positive(e, "extract.videos_per_decode_task", x.videos_per_decode_task)
    _non_negative(e, "extract.seek_min_frames", x.seek_min_frames)
    _non_negative(e, "extract.encoder_threads", x.encoder_threads)
    if x.image_size < 32:
        e.append(f"extract.image_size={x.image_size} must be >= 32 (ResNet-50 downsamples 32x)")
    if x.import_name:  # part of the stored identity "external:<name>"
        _name(e, "extract.import_name", x.import_name)

    g = cfg.graph
    _positive(e, "graph.n_clips", g.n_clips)
    if g.n_clips > 0 and x.grid_size > 0 and x.grid_size % g.n_clips:
        e.append(f"graph.n_clips={g.n_clips} must divide extract.grid_size={x.grid_size} "
                 "(each clip is the mean of G / N_c grid frames)")
    _positive(e, "graph.n_shards", g.n_shards)

    m = cfg.model
    _positive(e, "model.dim", m.dim)
    _positive(e, "model.hidden", m.hidden)
    _positive(e, "model.a_pos", m.a_pos)
    _positive(e, "model.a_neg", m.a_neg)
    if m.trainable_clip_features and not m.use_visual:
        e.append("model.trainable_clip_features=true needs model.use_visual=true (without "
                 "visual features the free clip table is already trainable)")

    t = cfg.train
    for name in ("epochs", "batch_size", "lr", "workers", "patience"):
        _positive(e, f"train.{name}", getattr(t, name))
    for name in ("alpha", "beta", "l2", "grad_clip", "checkpoint_every_steps", "max_failures",
                 "steps_per_epoch"):
        _non_negative(e, f"train.{name}", getattr(t, name))
    if t.alpha == 0 and t.beta == 0:
        e.append("train.alpha and train.beta are both 0: nothing to train")
    if t.zero_stage not in (0, 1, 2):
        e.append(f"train.zero_stage={t.zero_stage} must be 0, 1 or 2")
    if t.workers > g.n_shards:
        e.append(f"train.workers={t.workers} exceeds graph.n_shards={g.n_shards}: every worker "
                 "needs at least one shard")
    _name(e, "train.run_name", t.run_name)

    if not cfg.evaluate.ks or any(k <= 0 for k in cfg.evaluate.ks):
        e.append(f"evaluate.ks={list(cfg.evaluate.ks)} must be non-empty and positive")
    _positive(e, "evaluate.batch_size", cfg.evaluate.batch_size)
    _positive(e, "score.top_k", cfg.score.top_k)
    _positive(e, "score.users_per_chunk", cfg.score.users_per_chunk)
    _positive(e, "score.videos_per_block", cfg.score.videos_per_block)
    if cfg.score.actors < 0:
        e.append(f"score.actors={cfg.score.actors} must be >= 0 (0: one per GPU, else one per "
                 "CPU)")
    _positive(e, "score.shard_task_cpus", cfg.score.shard_task_cpus)
    sw = cfg.sweep
    bad = [n for n in sw.n_clips if n <= 0 or (x.grid_size > 0 and x.grid_size % n)]
    if bad and x.grid_size > 0:
        divisors = [d for d in range(1, x.grid_size + 1) if x.grid_size % d == 0]
        e.append(f"sweep.n_clips={list(sw.n_clips)}: {bad} must divide extract.grid_size="
                 f"{x.grid_size} (each clip is the mean of G / N_c grid frames; divisors: "
                 f"{divisors})")
    if len(set(sw.n_clips)) != len(sw.n_clips):
        e.append(f"sweep.n_clips={list(sw.n_clips)} lists an N_c twice")
    if sw.name:  # empty: the run name
        _name(e, "sweep.name", sw.name)
    _non_negative(e, "plan.worker_memory_gb", cfg.plan.worker_memory_gb)
    _non_negative(e, "plan.gpu_memory_gb", cfg.plan.gpu_memory_gb)
    if not 0 < cfg.plan.shard_fraction <= 1:
        e.append(f"plan.shard_fraction={cfg.plan.shard_fraction} must be in (0, 1]")
    if not cfg.tracking.experiment.strip():
        e.append("tracking.experiment must name an MLflow experiment (default: frame-dist)")
    if not cfg.store.root:
        e.append("store.root must be set (a local path or s3://bucket/prefix)")
    elif "://" in cfg.store.root and not cfg.store.root.startswith(("s3://", "file://")):
        e.append(f"store.root={cfg.store.root!r}: only local paths, file:// and s3:// URIs are "
                 "supported")
    if e:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(e))


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key.sub=value`` overrides, then world preset, then validation."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got "
                              f"{type(loaded).__name__}")
        data = loaded or {}
    explicit: set[str] = set(_flatten_keys(data))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(data, key, value)
        explicit.add(key)
    cfg = from_dict(data)
    _apply_world_preset(cfg, explicit)
    _apply_model_preset(cfg, explicit)
    return cfg.validate()


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=1e-3`` -> ("train.lr", 0.001); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    return key, value


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _flatten_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, dict):
            keys.extend(_flatten_keys(v, full + "."))
    return keys


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _apply_world_preset(cfg: Config, explicit: set[str]) -> None:
    preset = WORLD_PRESETS.get(cfg.world.preset)
    if preset is None:
        return
    for name, value in preset.items():
        if f"world.{name}" not in explicit:
            setattr(cfg.world, name, value)


def _apply_model_preset(cfg: Config, explicit: set[str]) -> None:
    preset = MODEL_PRESETS.get(cfg.model.preset)
    if preset is None:
        raise ConfigError(f"model.preset={cfg.model.preset!r} must be one of "
                          f"{sorted(MODEL_PRESETS)}")
    for key, value in preset.items():
        if key not in explicit:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)


def _build(cls: type, data: Any, where: str) -> Any:
    label = where or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown field {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        path = f"{where}.{f.name}" if where else f.name
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Convert a YAML value to the annotated type, or raise naming the field."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                last = exc
        raise last or ConfigError(f"{path}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r} must be one of {list(allowed)}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return {_coerce(kt, k, path): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if not math.isfinite(number):  # no setting of frame-dist means anything at inf or nan
            raise ConfigError(f"{path} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path} must be a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def _check_types(obj: Any, where: str) -> None:
    """Re-run coercion over a config built in code, so direct attribute edits are checked too."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        path = f"{where}.{f.name}" if where else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_types(value, path)
        else:
            setattr(obj, f.name, _coerce(hints[f.name], _to_plain(value), path))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
