"""Stage [train]: Ray Train workers running a DeepSpeed engine around FRAME.

The Ray and DeepSpeed touchpoints all live here:

* ``run_training(cfg, store)`` (driver): checks the graph and the validation split before any
  worker starts (:func:`check_trainable`, :func:`check_validation_split`), claims the run
  (``run.json``), opens the run's MLflow run when tracking is on (``frame_dist.tracking``),
  then runs a ``TorchTrainer`` with W workers (gloo on CPU, NCCL on GPU) and
  ``FailureConfig(max_failures)``; the run lives in ``run_dir(train.run_name)``, so launching
  a finished or crashed run again with the same name resumes it from its latest checkpoint.
* ``train_loop_per_worker(config)`` (each worker): loads only its graph shard(s) and the clip
  features of its own videos, builds FRAME with :class:`DistributedPropagation`, wraps the
  model + loss in a DeepSpeed engine (Adam, gradient clipping, ZeRO stage 0/1/2) and runs the
  shared loop (``frame_dist.train.loop.fit``: epochs, validation, early stopping on AUC, the
  calibration on the validation split, the final test pass) with its hooks: its share of
  every global batch, the engine's step, the evaluation of every worker's pairs gathered, the
  calibration fitted alike on every worker, and a checkpoint (DeepSpeed state + the loop's
  state + best weights, ``frame_dist.train.artifacts.Checkpoint``) reported to Ray Train every
  epoch and every ``checkpoint_every_steps`` steps. Rank 0 writes ``model.pt``,
  ``metrics.json`` and ``model_card.md`` (``artifacts.SavedModel``, ``artifacts.RunMetrics``,
  ``artifacts.ModelCard``) and, with tracking on, logs every epoch, the test metrics and those
  files to MLflow (``tracking.RunLogger``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from feature_store.store import Store
from frame_dist.config import Config, ConfigError, EvaluateConfig, from_dict
from frame_dist.console import (
    Progress,
    drain_worker_output,
    route_worker_warnings,
    worker_line,
)
from frame_dist.graph.manifest import GraphManifest
from frame_dist.graph.shards import (
    check_graph,
    load_clip_features,
    load_shards,
    split_label_counts,
)
from frame_dist.model.calibration import Calibration
from frame_dist.model.clip_inputs import clip_inputs_for
from frame_dist.model.distributed import DistributedPropagation
from frame_dist.model.frame import FRAME
from frame_dist.tracking import RunLogger, TrackedRun, open_run
from frame_dist.train.artifacts import (
    RUNS,
    STATE_TAG,
    Checkpoint,
    ModelCard,
    RunClaim,
    RunMetrics,
    SavedModel,
    TrainState,
    run_dir,
    run_path,
)
from frame_dist.train.loop import (
    LoopHooks,
    check_split_labels,
    engine_step,
    fit,
    optimizer_state_bytes,
)
from frame_dist.train.safe_load import UnsafeCheckpointError, use_safe_loading
from frame_dist.train.trainer import (
    Pairs,
    autocast_for,
    build_loss,
    build_model,
    calibrate,
    evaluate,
)
from frame_dist.train.worker_data import WorkerData, owned_clip_inputs


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    """The DeepSpeed config derived from our typed config (train.*)."""
    micro = max(1, math.ceil(cfg.train.batch_size / world))
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch.optim.Adam, bit-identical to 1 process
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` in an initialised process group, without DeepSpeed's
    shared-memory all-reduce op.

    That op serves only DeepSpeed-Inference's ``inference_all_reduce``; training reduces through
    torch.distributed either way. On a CPU accelerator DeepSpeed builds it (two C++ files, 35-50
    s of CPU on a 2-core machine) in the first engine of every fresh machine and whenever the
    build cache in ``~/.cache/torch_extensions`` does not match, while the other workers wait on
    the build's lock.
    """
    import deepspeed

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # probed once, then kept
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


def run_fingerprint(cfg: Config, graph_manifest: GraphManifest) -> str:
    """Identity of a training run: the graph it trains on and every model/train setting."""
    import dataclasses
    import hashlib

    train = dataclasses.asdict(cfg.train)
    for operational in ("max_failures", "checkpoint_every_steps"):  # no effect on the result
        train.pop(operational)
    parts = {"graph": graph_manifest.fingerprint, "model": dataclasses.asdict(cfg.model),
             "train": train}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TrainableRun:
    """What the driver checks and computes once per job and passes down."""

    manifest: GraphManifest  # the committed graph, checked (check_graph)
    fingerprint: str  # the run's identity (run_fingerprint)


def check_trainable(cfg: Config, store: Store) -> TrainableRun:
    """The graph (present, enough shards for train.workers, every file there) and the run's
    fingerprint, before any cluster time is spent."""
    manifest = check_graph(store, cfg.graph.n_clips, cfg.train.workers)
    return TrainableRun(manifest, run_fingerprint(cfg, manifest))


def check_validation_split(store: Store, manifest: GraphManifest) -> None:
    """Refuse, at the driver, a validation split that cannot rank (empty or one class): the
    workers' early stopping compares its AUC (``loop.fit`` guards the same)."""
    check_split_labels("valid", *split_label_counts(store, manifest, "valid"))


def finished_run(cfg: Config, store: Store, fingerprint: str) -> dict[str, Any] | None:
    """The metrics of a finished run with exactly these inputs and settings, else None."""
    metrics = RunMetrics.read(store, cfg.train.run_name)
    if metrics is None or metrics.fingerprint != fingerprint:
        return None
    return metrics.to_dict()


# --------------------------------------------------------------------------- worker side


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    route_worker_warnings()  # ours (bf16 on this CPU, tracking) on the job's console, once
    cfg = from_dict(loop_config["config"]).validate()
    if loop_config.get("cpus_per_worker"):
        torch.set_num_threads(loop_config["cpus_per_worker"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # MLflow: rank 0 only (the driver opened the run; None when tracking is off)
    tracker = RunLogger(TrackedRun(**loop_config["tracking"])
                        if rank == 0 and loop_config.get("tracking") else None)
    store = Store.from_config(cfg.store)
    n_clips = cfg.graph.n_clips

    # --- data: my shards, my videos' clip features only
    graph_manifest = check_graph(store, n_clips, world)
    n_shards = graph_manifest.n_shards
    shard, manifest = load_shards(store, n_clips, [k for k in range(n_shards) if k % world == rank])
    features, table_init = None, None
    # frozen features on W > 1: partitioned by owner, R~ X streamed (worker_data.owned_clip_inputs)
    owned = world > 1 and cfg.model.use_visual and not cfg.model.trainable_clip_features
    if cfg.model.trainable_clip_features:  # the model's table: every clip, on every worker
        table_init = torch.from_numpy(
            load_clip_features(store, manifest, np.arange(manifest.n_videos)))
    elif cfg.model.use_visual and not owned:
        features = load_clip_features(store, manifest, shard.video_ids)
    data = WorkerData.from_shard(shard, n_clips, manifest.n_train, features,
                                 with_negative=cfg.model.use_negative).to(device)
    group = dist.new_group(backend=dist.get_backend()) if world > 1 else None
    propagation = DistributedPropagation(data.global_clip_ids, group)

    # --- model, loss, engine
    model = build_model(cfg.model, len(manifest.feature_mean),
                        n_clips_total=manifest.n_videos * n_clips, propagation=propagation,
                        seed=cfg.train.seed, clip_features=table_init)
    del table_init
    if owned:
        data.clip_features = owned_clip_inputs(store, manifest, data, propagation, rank, world)
    else:  # one worker, frozen features: R~ X precomputed once (model.clip_inputs)
        data.clip_features = clip_inputs_for(model, data.clip_features, data.graph)
    from frame_dist.model.loss import FRAMETrainTask

    task = FRAMETrainTask(model, build_loss(cfg.train, cfg.model.use_negative), data.clip_features,
                          data.graph)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    engine = initialize_engine(task, optimizer, deepspeed_config(cfg, world))
    use_safe_loading(engine)  # DeepSpeed itself unpickles with weights_only=False
    autocast = autocast_for(device, cfg.train.precision)  # the forward's; backward outside

    # --- resume
    state, best = TrainState(fingerprint=loop_config["fingerprint"]), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        _log(rank, f"run {cfg.train.run_name}: no registered checkpoint, starting at epoch 1")
    else:
        with checkpoint.as_directory() as ckpt_dir:
            try:
                path, client = engine.load_checkpoint(ckpt_dir, tag=STATE_TAG)
            except UnsafeCheckpointError as exc:
                raise UnsafeCheckpointError(f"checkpoint {checkpoint.path} of run "
                                            f"{cfg.train.run_name}: {exc}") from exc
            if path is None:
                raise RuntimeError(f"rank {rank}: checkpoint {ckpt_dir} could not be loaded; "
                                   "refusing to restart the run from scratch")
            saved = Checkpoint.read(ckpt_dir, client)
        state, best = saved.state, saved.best_weights
        state.resumes.append(state.global_step)
        _log(rank, f"resumed at epoch {state.epoch} step {state.step} "
                   f"(global step {state.global_step})")

    def save(state: TrainState, best: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        checkpoint = Checkpoint(state, best)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=STATE_TAG, client_state=checkpoint.client_state())
            if rank == 0:
                checkpoint.write_weights(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if state.step == 0 and state.history:  # the end of an epoch (not a mid-epoch save)
            tracker.epoch(state.history[-1])

    def all_reduce(sums: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(sums)
        return sums

    def label_counts(split: str) -> tuple[int, int]:
        labels = data.eval_sets[split][2]
        counts = all_reduce(torch.tensor([len(labels), int(labels.sum())], device=device))
        return int(counts[0]), int(counts[1])

    def begin_epoch() -> None:
        propagation.reset_bytes()
        engine.train()

    hooks = LoopHooks(
        model=model,
        batch=lambda positions: data.local_batch(positions, cfg.train.batch_size, world, device),
        step=engine_step(engine, autocast),
        evaluate=lambda split, calibration: evaluate_split(model, data, split, cfg.evaluate,
                                                           calibration),
        calibrate=lambda: calibrate_valid(model, data, cfg.evaluate),
        label_counts=label_counts, world=world, all_reduce=all_reduce, begin_epoch=begin_epoch,
        sent_bytes=propagation.reset_bytes,
        # ZeRO wraps torch's optimizer
        optimizer_state_bytes=lambda: optimizer_state_bytes(
            getattr(engine.optimizer, "optimizer", engine.optimizer)),
        save=save, log=lambda message: _log(rank, message))
    result = fit(hooks, cfg.train, data.n_train_global, state, best, validate=True, test=True)
    if rank == 0:
        write_outputs(cfg, store, model, result.state, result.test, result.calibration,
                      result.valid)
        tracker.finished(result.test, store, cfg.train.run_name)
    ray.train.report({"test_" + k: v for k, v in result.test.items()} |
                     {"global_step": result.state.global_step})


def evaluate_split(model: FRAME, data: WorkerData, split: str, settings: EvaluateConfig,
                   calibration: Calibration | None = None) -> dict[str, float]:
    """Metrics of ``split`` over every worker's pairs: each worker scores its own rows in fp32
    (``trainer.evaluate``: the user side once, then chunks of :func:`eval_chunk` pairs), the
    (global user, label, logit) arrays are gathered, and every worker computes the metrics."""
    users, videos, labels = data.eval_sets[split]
    return evaluate(model, data.clip_features, data.graph, users, videos, labels, settings.ks,
                    eval_chunk(settings), rank_users=data.user_rows[users], gather=gather_pairs,
                    calibration=calibration)


def eval_chunk(settings: EvaluateConfig) -> int:
    """Pairs per chunk on each of the W workers: ``evaluate.batch_size`` / W, so that a chunk
    of every worker together (whose clips' union each worker's clip side holds) is
    ``evaluate.batch_size`` pairs, as on one process."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return max(1, -(-settings.batch_size // world))


def calibrate_valid(model: FRAME, data: WorkerData, settings: EvaluateConfig
                    ) -> tuple[Calibration, dict[str, float]]:
    """``trainer.calibrate`` on every worker's validation pairs, gathered: every worker fits
    the same arrays, so all hold the same calibration."""
    users, videos, labels = data.eval_sets["valid"]
    return calibrate(model, data.clip_features, data.graph, users, videos, labels, settings.ks,
                     eval_chunk(settings), rank_users=data.user_rows[users], gather=gather_pairs)


def gather_pairs(pairs: Pairs) -> Pairs:
    """Every worker's (user, label, logit) arrays, concatenated in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return pairs
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pairs)
    u, y, s = (np.concatenate([g[i] for g in gathered]) for i in range(3))
    return u, y, s


def write_outputs(cfg: Config, store: Store, model: FRAME, state: TrainState,
                  test: dict[str, float], calibration: Calibration | None = None,
                  valid: dict[str, float] | None = None) -> None:
    """model.pt (arguments + best weights + calibration + config), metrics.json, config.yaml
    and model_card.md of the run. ``valid``: the calibrated validation metrics (default: the
    best epoch's)."""
    name = cfg.train.run_name
    SavedModel.from_model(model, cfg.to_dict(), calibration).write(store, name)
    RunMetrics.from_state(state, test, cfg.graph.n_clips, cfg.train.workers, calibration,
                          valid).write(store, name)
    store.write_bytes_atomic(run_path(name, "config.yaml"), cfg.to_yaml().encode())
    ModelCard.for_run(store, name, cfg.to_dict()).write(store)  # the evaluate stage redoes it


def _log(rank: int, message: str) -> None:
    if rank == 0:  # one line per event, from rank 0, for the job's console
        worker_line(f"train: {message}")


# --------------------------------------------------------------------------- driver side


def run_training(cfg: Config, store: Store, run: TrainableRun | None = None) -> dict[str, Any]:
    """Train with Ray Train + DeepSpeed; return the run's metrics.json content.

    ``run``: the job's :func:`check_trainable` (graph and fingerprint; made here when None).
    The validation split is refused here, before any worker starts, when it cannot rank.
    """
    run = run if run is not None else check_trainable(cfg, store)
    check_validation_split(store, run.manifest)
    claim_run(cfg, store, run.fingerprint)
    tracked = open_run(cfg, store)  # the MLflow run (None: tracking off)
    try:
        metrics = _fit(cfg, store, run, tracked)
    except BaseException:
        if tracked is not None:
            tracked.finish(ok=False)
        raise
    if tracked is not None:
        tracked.finish(ok=True)
        print(f"train: logged to MLflow: {tracked.where()}")
    return metrics


def _fit(cfg: Config, store: Store, run: TrainableRun, tracked: TrackedRun | None
         ) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from frame_dist.ray_runtime import cluster_has_gpus

    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster_has_gpus()
    storage_path, storage_fs = _run_storage(store)
    # On CPU a worker gets its share of the cluster's cores (Ray sets OMP_NUM_THREADS, and so
    # torch's thread count, from this reservation; one core per worker would idle the rest).
    cpus = 1 if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1))
                                 // cfg.train.workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # the store as the driver resolved it (a relative local root means nothing to workers)
        train_loop_config={"config": {**cfg.to_dict(),
                                      "store": {**cfg.to_dict()["store"], "root": store.root}},
                           "cpus_per_worker": None if use_gpu else cpus,
                           "fingerprint": run.fingerprint,
                           "tracking": asdict(tracked) if tracked else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    # the workers' epoch lines reach the console through the driver (console.route_worker_logs)
    with Progress(cfg.train.epochs, "train", "epoch", advance_on="train: epoch "):
        trainer.fit()
        drain_worker_output()
    metrics = RunMetrics.read(store, cfg.train.run_name)
    if metrics is None:
        raise RuntimeError(f"run {cfg.train.run_name}: Ray Train finished without writing "
                           f"{store.uri(run_path(cfg.train.run_name, RunMetrics.FILE))}")
    return metrics.to_dict()


def claim_run(cfg: Config, store: Store, fingerprint: str) -> None:
    """Record which inputs and settings own ``run_dir(run_name)`` (``run.json``); refuse a
    different claim.

    Ray Train resumes any run with the same name from its latest checkpoint, so a relaunch with
    another graph or other settings must be refused before it starts, not silently mixed.
    """
    name = cfg.train.run_name
    owner = RunClaim.read(store, name)
    if owner is None:
        RunClaim(fingerprint, cfg.to_dict()).write(store, name)
    elif owner.fingerprint != fingerprint:
        raise ConfigError(
            f"run {name!r} in {store.uri(run_dir(name))} was started with "
            "another graph or other model/train settings; resuming it would mix them. "
            "Choose another train.run_name, or delete that folder to start over.")


def _run_storage(store: Store):
    """Ray Train storage for <store>/runs: a local path, or the store's S3 filesystem."""
    if not store.root.startswith("s3://"):
        os.makedirs(store.path(RUNS), exist_ok=True)
        return store.path(RUNS), None
    import pyarrow.fs

    return store.path(RUNS), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))
