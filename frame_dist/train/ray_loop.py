"""Stage [train]: Ray Train workers running a DeepSpeed engine around FRAME.

The Ray and DeepSpeed touchpoints all live here:

* ``run_training(cfg, store)`` (driver): checks the graph before any cluster time is spent,
  then runs a ``TorchTrainer`` with W workers (gloo on CPU, NCCL on GPU) and
  ``FailureConfig(max_failures)``; the run lives in ``<store>/runs/<train.run_name>``, so
  launching a finished or crashed run again with the same name resumes it from its latest
  checkpoint.
* ``train_loop_per_worker(config)`` (each worker): loads only its graph shard(s) and the clip
  features of its own videos, builds FRAME with :class:`DistributedPropagation`, wraps the
  model + loss in a DeepSpeed engine (Adam, gradient clipping, ZeRO stage 0/1/2), trains on its
  share of every global batch, evaluates on the validation split after every epoch (early
  stopping on AUC), and reports metrics plus a checkpoint (DeepSpeed state, best weights,
  epoch/step counters) to Ray Train every epoch and every ``checkpoint_every_steps`` steps.
  At the end it evaluates the best weights on the test split; rank 0 writes ``model.pt`` (model
  arguments + weights + config, loadable with ``weights_only=True``) and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from feature_store.store import Store
from frame_dist.config import Config, ConfigError, EvaluateConfig, from_dict
from frame_dist.graph.shards import check_graph, load_clip_features, load_shards
from frame_dist.model.distributed import DistributedPropagation
from frame_dist.model.frame import FRAME
from frame_dist.model.metrics import all_metrics
from frame_dist.train.trainer import autocast_for, build_loss, build_model
from frame_dist.train.worker_data import WorkerData, epoch_permutation

STATE_TAG = "state"  # DeepSpeed checkpoint tag inside each Ray Train checkpoint
BEST_FILE = "best_model.pt"


def run_dir(cfg: Config) -> str:
    return f"runs/{cfg.train.run_name}"


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


def run_fingerprint(cfg: Config, graph_manifest: dict[str, Any]) -> str:
    """Identity of a training run: the graph it trains on and every model/train setting."""
    import dataclasses
    import hashlib

    train = dataclasses.asdict(cfg.train)
    for operational in ("max_failures", "checkpoint_every_steps"):  # no effect on the result
        train.pop(operational)
    parts = {"graph": graph_manifest["fingerprint"], "model": dataclasses.asdict(cfg.model),
             "train": train}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def finished_run(cfg: Config, store: Store) -> dict[str, Any] | None:
    """The metrics of a finished run with exactly these inputs and settings, else None."""
    path = f"{run_dir(cfg)}/metrics.json"
    manifest = check_graph(store, cfg.graph.n_clips, cfg.train.workers)
    if not store.exists(path):
        return None
    metrics = store.read_json(path)
    return metrics if metrics.get("fingerprint") == run_fingerprint(cfg, manifest) else None


def check_trainable(cfg: Config, store: Store) -> dict[str, Any]:
    """Everything that can be refused before a worker starts."""
    return check_graph(store, cfg.graph.n_clips, cfg.train.workers)


# --------------------------------------------------------------------------- worker side


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    cfg = from_dict(loop_config["config"]).validate()
    if loop_config.get("cpus_per_worker"):
        torch.set_num_threads(loop_config["cpus_per_worker"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    store = Store.from_config(cfg.store)
    n_clips = cfg.graph.n_clips

    # --- data: my shards, my videos' clip features only
    graph_manifest = check_graph(store, n_clips, world)
    n_shards = graph_manifest["n_shards"]
    shard, manifest = load_shards(store, n_clips, [k for k in range(n_shards) if k % world == rank])
    features, table_init = None, None
    if cfg.model.trainable_clip_features:  # the model's table: every clip, on every worker
        table_init = torch.from_numpy(
            load_clip_features(store, manifest, np.arange(manifest["n_videos"])))
    elif cfg.model.use_visual:
        features = load_clip_features(store, manifest, shard.video_ids)
    data = WorkerData.from_shard(shard, n_clips, manifest["n_train"], features,
                                 with_negative=cfg.model.use_negative).to(device)
    group = dist.new_group(backend=dist.get_backend()) if world > 1 else None
    propagation = DistributedPropagation(data.global_clip_ids, group)

    # --- model, loss, engine
    model = build_model(cfg.model, len(manifest["feature_mean"]),
                        n_clips_total=manifest["n_videos"] * n_clips, propagation=propagation,
                        seed=cfg.train.seed, clip_features=table_init)
    del table_init
    from frame_dist.model.loss import FRAMETrainTask

    task = FRAMETrainTask(model, build_loss(cfg.train, cfg.model), data.clip_features,
                          data.graph)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world),
                                           dist_init_required=False)
    autocast = autocast_for(device, cfg.train.precision)  # the forward's; backward outside

    # --- resume
    state = {"epoch": 1, "step": 0, "global_step": 0, "best_auc": -1.0, "best_epoch": 0,
             "stale": 0, "done": False, "history": [], "resumes": [],
             "fingerprint": run_fingerprint(cfg, graph_manifest)}
    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        _log(rank, f"run {cfg.train.run_name}: no registered checkpoint, starting at epoch 1")
    else:
        with checkpoint.as_directory() as ckpt_dir:
            path, client = engine.load_checkpoint(ckpt_dir, tag=STATE_TAG)
            if path is None or "frame" not in (client or {}):
                raise RuntimeError(f"rank {rank}: checkpoint {ckpt_dir} could not be loaded; "
                                   "refusing to restart the run from scratch")
            state = client["frame"]
            state["resumes"] = [*state.get("resumes", []), state["global_step"]]
            best_state = torch.load(os.path.join(ckpt_dir, BEST_FILE), map_location="cpu",
                                    weights_only=True)
        _log(rank, f"resumed at epoch {state['epoch']} step {state['step']} "
                   f"(global step {state['global_step']})")

    def save(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=STATE_TAG, client_state={"frame": state})
            if rank == 0:
                torch.save(best_state, os.path.join(tmp, BEST_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    batch_size, n_train = cfg.train.batch_size, data.n_train_global
    steps = data.steps_per_epoch(batch_size)
    if cfg.train.steps_per_epoch:
        steps = min(steps, cfg.train.steps_per_epoch)
    while not state["done"] and state["epoch"] <= cfg.train.epochs:
        epoch = state["epoch"]
        order = epoch_permutation(cfg.train.seed, epoch, n_train)
        start, loss_sum, bytes_sent = time.perf_counter(), torch.zeros((), device=device), 0
        propagation.reset_bytes()
        engine.train()
        first_step, seen = state["step"], 0
        for step in range(first_step, steps):
            positions = order[step * batch_size:(step + 1) * batch_size]
            batch = data.local_batch(positions, batch_size, world, device)
            with autocast:
                loss, _ = engine(batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float() * (len(positions) / world)  # sum of batch losses
            seen += len(positions)
            state["step"], state["global_step"] = step + 1, state["global_step"] + 1
            every = cfg.train.checkpoint_every_steps
            if every and state["global_step"] % every == 0 and step + 1 < steps:
                save({"epoch": epoch, "global_step": state["global_step"]})
        bytes_sent = propagation.reset_bytes()
        train_seconds = time.perf_counter() - start
        if world > 1:
            dist.all_reduce(loss_sum)
        valid = evaluate_split(model, data, "valid", cfg.evaluate, autocast)
        entry = {"epoch": epoch,  # loss per interaction, as the single-process trainer's
                 "loss": float(loss_sum) / max(seen, 1),
                 "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
                 "steps": steps - first_step,
                 "peak_rss_mb": _peak_rss_mb(world),
                 "propagation_bytes_per_step": bytes_sent / max(steps - first_step, 1),
                 "optimizer_state_bytes": _optimizer_state_bytes(engine),
                 "valid": valid}
        state["history"].append(entry)
        if valid.get("auc", -1.0) > state["best_auc"]:
            state.update(best_auc=valid["auc"], best_epoch=epoch, stale=0)
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["stale"] += 1
        state.update(epoch=epoch + 1, step=0)
        if state["stale"] >= cfg.train.patience or epoch == cfg.train.epochs:
            state["done"] = True
        _log(rank, f"epoch {epoch}: loss {entry['loss']:.4f} valid auc "
                   f"{valid.get('auc', float('nan')):.4f} ({entry['seconds']:.1f}s)")
        save({"epoch": epoch, "global_step": state["global_step"], "loss": entry["loss"],
              **{f"valid_{k}": v for k, v in valid.items()}})

    # --- final: best weights on the test split
    model.load_state_dict(best_state)
    test = evaluate_split(model, data, "test", cfg.evaluate, autocast)
    if rank == 0:
        write_outputs(cfg, store, model, state, test, state["fingerprint"])
    ray.train.report({"test_" + k: v for k, v in test.items()} |
                     {"global_step": state["global_step"]})


def _optimizer_state_bytes(engine: Any) -> int:
    """Bytes of this worker's optimizer state (Adam moments; ZeRO >= 1 holds only its part)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


@torch.no_grad()
def evaluate_split(model: FRAME, data: WorkerData, split: str, settings: EvaluateConfig,
                   autocast) -> dict[str, float]:
    """Metrics of ``split`` over every worker's users (each worker scores its own rows, one
    propagation, then ``settings.batch_size`` pairs at a time)."""
    users, videos, labels = data.eval_sets[split]
    device = data.global_clip_ids.device
    was_training = model.training
    model.eval()
    with autocast:
        logits = model.score_pairs(data.clip_features, data.graph,
                                   torch.as_tensor(users, device=device),
                                   torch.as_tensor(videos, device=device),
                                   batch_size=settings.batch_size)
    model.train(was_training)
    mine = (data.user_rows[users], labels, logits.float().cpu().numpy())
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    u, y, s = (np.concatenate([g[i] for g in gathered]) for i in range(3))
    if len(y) == 0 or y.min() == y.max():
        return {}  # nothing to rank (tiny data): early stopping then keeps the first epoch
    return all_metrics(u, y, s, settings.ks)


def write_outputs(cfg: Config, store: Store, model: FRAME, state: dict[str, Any],
                  test: dict[str, float], fingerprint: str) -> None:
    """model.pt (arguments + best weights + config) and metrics.json beside the checkpoints."""
    import io

    buffer = io.BytesIO()
    torch.save({"model_args": model.model_args(),
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "config": cfg.to_dict()}, buffer)
    rdir = run_dir(cfg)
    store.write_bytes_atomic(f"{rdir}/model.pt", buffer.getvalue())
    history = state["history"]
    metrics = {"test": test, "best_epoch": state["best_epoch"],
               "valid": history[state["best_epoch"] - 1]["valid"] if state["best_epoch"] else {},
               "global_step": state["global_step"], "epochs_run": len(history),
               "resumed_at_steps": state["resumes"],
               "history": history, "n_clips": cfg.graph.n_clips,
               "workers": cfg.train.workers, "fingerprint": fingerprint}
    store.write_json(f"{rdir}/metrics.json", metrics)
    store.write_bytes_atomic(f"{rdir}/config.yaml", cfg.to_yaml().encode())


def _peak_rss_mb(world: int) -> list[float]:
    """Peak resident memory of every worker process (MiB), gathered to all ranks."""
    import resource

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    if world == 1:
        return [mine]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[train] {message}", flush=True)


# --------------------------------------------------------------------------- driver side


def run_training(cfg: Config, store: Store) -> dict[str, Any]:
    """Train with Ray Train + DeepSpeed; return the run's metrics.json content."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from frame_dist.ray_runtime import cluster_has_gpus

    manifest = check_trainable(cfg, store)
    claim_run(cfg, store, run_fingerprint(cfg, manifest))
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
                           "cpus_per_worker": None if use_gpu else cpus},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
    return json.loads(store.read_bytes(f"{run_dir(cfg)}/metrics.json"))


def claim_run(cfg: Config, store: Store, fingerprint: str) -> None:
    """Record which inputs and settings own ``runs/<run_name>``; refuse a different claim.

    Ray Train resumes any run with the same name from its latest checkpoint, so a relaunch with
    another graph or other settings must be refused before it starts, not silently mixed.
    """
    path = f"{run_dir(cfg)}/run.json"
    if store.exists(path):
        owner = store.read_json(path)
        if owner.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"run {cfg.train.run_name!r} in {store.uri(run_dir(cfg))} was started with "
                "another graph or other model/train settings; resuming it would mix them. "
                "Choose another train.run_name, or delete that folder to start over.")
        return
    store.write_json(path, {"fingerprint": fingerprint, "config": cfg.to_dict()})


def _run_storage(store: Store):
    """Ray Train storage for <store>/runs: a local path, or the store's S3 filesystem."""
    if not store.root.startswith("s3://"):
        os.makedirs(store.path("runs"), exist_ok=True)
        return store.path("runs"), None
    import pyarrow.fs

    return store.path("runs"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))
