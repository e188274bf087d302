"""Single-process training of FRAME: plain torch, CPU or CUDA, straight from config to loop.

``train(...)`` runs the shared loop (``frame_dist.train.loop.fit``: epochs, early stopping on
validation AUC, history, best weights) with a plain torch Adam step on one process and returns
the history, the best weights and their calibration. ``evaluate(...)`` computes the paper's
metrics for any set of (user, video, full-watch label) triples from fp32 logits: the one
evaluation path of the trainer, the Ray Train workers (their pairs gathered) and the evaluate
stage; ``calibrate(...)`` fits Platt scaling on the same logits. The distributed trainer reuses
the same pieces (``build_model``, ``build_loss``, ``FRAMETrainTask``, ``evaluate``,
``calibrate``, ``autocast_for``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from frame_dist.config import (
    EvaluateConfig,
    ModelConfig,
    Precision,
    TrainConfig,
    bf16_activations,
)
from frame_dist.console import FrameDistWarning
from frame_dist.graph.clip_graph import Interactions, clip_labels
from frame_dist.model.calibration import Calibration, fit_platt
from frame_dist.model.clip_inputs import clip_inputs_for
from frame_dist.model.distributed import DistributedPropagation
from frame_dist.model.frame import FRAME
from frame_dist.model.loss import FRAMETrainTask, HybridLoss, InteractionBatch
from frame_dist.model.metrics import all_metrics
from frame_dist.model.propagation import LocalPropagation, PropagationGraph
from frame_dist.train.artifacts import TrainState
from frame_dist.train.loop import LoopHooks, fit, optimizer_state_bytes, torch_step


@dataclass
class TrainData:
    """Training interactions as arrays: graph rows, videos and clip labels."""

    users: np.ndarray  # (n,) local user rows of the graph
    videos: np.ndarray  # (n,) video indices
    watched: np.ndarray  # (n,) fully played clips, N_c for a full watch (graph.clip_labels)

    def __post_init__(self) -> None:
        n = len(self.users)
        if np.shape(self.videos) != (n,) or np.shape(self.watched) != (n,):
            raise ValueError(f"TrainData: users ({n},), videos {np.shape(self.videos)} and "
                             f"watched {np.shape(self.watched)} must have the same length")

    @classmethod
    def from_interactions(cls, interactions: Interactions, n_clips: int) -> TrainData:
        """Training arrays of ``interactions`` (whole-graph user rows) with N_c clips."""
        return cls(interactions.user_idx, interactions.video_idx,
                   clip_labels(interactions.watch_ratio, interactions.full_watch, n_clips,
                               interactions.source_row))

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class EvalData:
    """(user, video, label) triples to evaluate; label 1 = full watch."""

    users: np.ndarray  # (n,) local user rows
    videos: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) 0/1

    @classmethod
    def from_interactions(cls, interactions: Interactions) -> EvalData:
        return cls(interactions.user_idx, interactions.video_idx,
                   interactions.full_watch.astype(np.int64))


@dataclass
class TrainResult:
    history: list[dict[str, Any]]  # one entry per epoch: losses, seconds, validation metrics
    best_state: dict[str, Tensor]  # model state dict (CPU) of the best validation AUC
    best_epoch: int  # 1-based epoch of best_state
    best_metrics: dict[str, float] = field(default_factory=dict)  # validation, calibrated
    stopped_early: bool = False
    state: TrainState = field(default_factory=TrainState)  # the loop's final state
    test: dict[str, float] = field(default_factory=dict)  # best weights on test_data ({}: none)
    calibration: Calibration = field(default_factory=Calibration)  # fitted on valid_data


def build_model(cfg: ModelConfig, n_clip_features: int, n_clips_total: int | None = None,
                propagation: LocalPropagation | None = None, seed: int | None = None,
                clip_features: Tensor | None = None) -> FRAME:
    """FRAME from a :class:`ModelConfig`; ``seed`` makes the initial weights reproducible.

    ``n_clips_total`` (C) sizes a model-owned clip table; ``clip_features`` (C, F), the whole
    graph's, start the table of ``trainable_clip_features`` (C defaults to its rows).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.trainable_clip_features:
        if clip_features is None:
            raise ValueError("model.trainable_clip_features=true: build_model needs the whole "
                             "graph's clip_features (C, F) to start the table from")
        n_clips_total = n_clips_total or int(clip_features.shape[0])
    model = FRAME(n_clip_features, dim=cfg.dim, hidden=cfg.hidden, a_pos=cfg.a_pos,
                  a_neg=cfg.a_neg, use_negative=cfg.use_negative, enhance=cfg.enhance,
                  use_visual=cfg.use_visual, n_clips_total=n_clips_total,
                  trainable_clip_features=cfg.trainable_clip_features,
                  aggregation=cfg.aggregation, propagation=propagation)
    if cfg.trainable_clip_features:
        model.init_clip_features(torch.as_tensor(clip_features))
    return model


def build_loss(cfg: TrainConfig, use_negative: bool) -> HybridLoss:
    """Eqs. 14-16 from the config (weights, eq. 14's position weights). Without negatives
    (``model.use_negative``) the pair-wise loss is off (Table 6)."""
    return HybridLoss(alpha=cfg.alpha, beta=cfg.beta if use_negative else 0.0, l2=cfg.l2,
                      position_weights=cfg.position_weights)


def resolve_device(use_gpu: bool | None) -> torch.device:
    """CUDA when asked (or when present and not refused), else CPU."""
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu=true but no CUDA device is visible")
    if use_gpu or (use_gpu is None and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86: AVX512-BF16 or AMX-BF16; else oneDNN's
    check, e.g. Arm BF16). Without it bf16 autocast still runs, but emulated and slowly."""
    caps = torch.cpu.get_capabilities()
    if caps.get("architecture") in ("x86_64", "x86", "AMD64"):
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device_type: str, precision: Precision) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on a device type; None: no autocast (fp32).

    "auto": bf16 on CUDA, fp32 elsewhere; "bf16": bf16 on every device; "fp32": fp32.
    """
    bf16 = bf16_activations(precision, device_type)
    return torch.bfloat16 if bf16 else None


def autocast_for(device: torch.device | str, precision: Precision = "auto") -> torch.autocast:
    """The autocast context of the forward pass under ``train.precision`` on ``device``.

    See :func:`autocast_dtype`; bf16 on CPU is fast with AMX or AVX512-BF16, and a warning says
    when this CPU has neither. Autocast only lowers the inputs of matmuls: weights, gradients
    and Adam state stay fp32, the sparse aggregations run in fp32 (``sparse_matmul``) and so
    does the loss (``HybridLoss``). Run the backward pass outside the context.
    """
    device = torch.device(device)
    dtype = autocast_dtype(device.type, precision)
    if dtype is not None and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn("train.precision='bf16' on a CPU without bf16 instructions (AVX512-BF16 "
                      "or AMX-BF16): it runs, but emulated and likely slower than "
                      "train.precision='fp32'", FrameDistWarning, stacklevel=2)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@torch.no_grad()
def predict(model: FRAME, clip_features: Tensor | None, graph: PropagationGraph,
            users: np.ndarray | Tensor, videos: np.ndarray | Tensor,
            batch_size: int = 8192, precision: Precision = "fp32") -> np.ndarray:
    """Logits y(u, v) (eq. 13) of (user, video) pairs: ``FRAME.score_pairs`` (one propagation
    to the pairs' clips, then ``batch_size`` pairs at a time).

    ``precision`` as ``train.precision`` (:func:`autocast_for`); the default fp32 is exact on
    every device. Logits come back as float32 either way.
    """
    was_training = model.training
    model.eval()
    try:
        device = model.layer_weights.device
        users_t = torch.as_tensor(np.asarray(users), dtype=torch.long, device=device)
        videos_t = torch.as_tensor(np.asarray(videos), dtype=torch.long, device=device)
        # no pairs: nothing to propagate, unless other workers' propagation needs this one's
        if len(users_t) == 0 and not isinstance(model.propagation, DistributedPropagation):
            model.check_pairs(users_t, videos_t, graph)
            return np.zeros(0, np.float32)
        with autocast_for(device, precision):
            logits = model.score_pairs(clip_features, graph, users_t, videos_t, batch_size)
        return logits.float().cpu().numpy()
    finally:
        model.train(was_training)


Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # (ranking user, label, logit) per pair


def scored_pairs(model: FRAME, clip_features: Tensor | None, graph: PropagationGraph,
                 users: np.ndarray, videos: np.ndarray, labels: np.ndarray,
                 batch_size: int = 8192, rank_users: np.ndarray | None = None,
                 gather: Callable[[Pairs], Pairs] | None = None) -> Pairs:
    """(ranking user, label, fp32 logit) of every pair, every process's joined by ``gather``.

    Always fp32, whatever ``train.precision``: bf16 logits (8 mantissa bits) would tie many
    pairs and move the metrics away from the evaluate stage's.
    """
    logits = predict(model, clip_features, graph, users, videos, batch_size, "fp32")
    pairs = (np.asarray(users if rank_users is None else rank_users), np.asarray(labels),
             logits)
    return gather(pairs) if gather is not None else pairs


def evaluate(model: FRAME, clip_features: Tensor | None, graph: PropagationGraph,
             users: np.ndarray, videos: np.ndarray, labels: np.ndarray,
             ks: Sequence[int] = (3, 5), batch_size: int = 8192,
             rank_users: np.ndarray | None = None,
             gather: Callable[[Pairs], Pairs] | None = None,
             calibration: Calibration | None = None) -> dict[str, float]:
    """AUC, Logloss, Recall@K and NDCG@K of the model on (user, video, full-watch) triples.

    fp32 logits by :func:`scored_pairs` (``FRAME.score_pairs``). ``rank_users`` (n,): the user
    id the ranking metrics group by (default ``users``; a worker passes its rows' global
    indices); ``gather``: joins every process's (user, label, logit) arrays before the metrics;
    ``calibration``: the model's, applied to ``logloss`` (``logloss_raw``: of sigmoid(y)).
    """
    pairs = scored_pairs(model, clip_features, graph, users, videos, labels, batch_size,
                         rank_users, gather)
    return all_metrics(*pairs, ks, calibration)


def calibrate(model: FRAME, clip_features: Tensor | None, graph: PropagationGraph,
              users: np.ndarray, videos: np.ndarray, labels: np.ndarray,
              ks: Sequence[int] = (3, 5), batch_size: int = 8192,
              rank_users: np.ndarray | None = None,
              gather: Callable[[Pairs], Pairs] | None = None
              ) -> tuple[Calibration, dict[str, float]]:
    """Platt scaling of the model on (user, video, full-watch) triples (the validation split,
    after training): ``fit_platt`` on the fp32 logits of every process's pairs (each process
    fits the same arrays alike), and the metrics of those pairs under it (as :func:`evaluate`).
    """
    pairs = scored_pairs(model, clip_features, graph, users, videos, labels, batch_size,
                         rank_users, gather)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibration = fit_platt(pairs[2], pairs[1])
    for warning in caught:  # a degenerate fit (identity kept): for the person at the console
        warnings.warn(str(warning.message), FrameDistWarning, stacklevel=2)
    return calibration, all_metrics(*pairs, ks, calibration)


def train(model: FRAME, clip_features: Tensor | None, graph: PropagationGraph,
          train_data: TrainData, valid_data: EvalData | None, cfg: TrainConfig,
          eval_cfg: EvaluateConfig | None = None, loss: HybridLoss | None = None,
          device: torch.device | str | None = None,
          log: Callable[[str], None] | None = None,
          test_data: EvalData | None = None) -> TrainResult:
    """Train ``model`` in place with :func:`frame_dist.train.loop.fit`; return the history and
    the best state (validation AUC). The model ends with the best weights.

    Adam (``cfg.lr``), batches of ``cfg.batch_size`` interactions in the loop's order
    (``loop.epoch_permutation`` of ``cfg.seed``), gradient-norm clipping at ``cfg.grad_clip``
    (0: off), at most ``cfg.epochs`` epochs, stopping after ``cfg.patience`` epochs without a
    better validation AUC. Without ``valid_data`` every epoch runs and the last state is
    returned; a validation set without both classes is refused (``loop.SplitError``). The
    training forward passes run under ``cfg.precision`` (:func:`autocast_for`); the weights,
    their gradients and Adam stay fp32, and the evaluation forward is fp32. After the last
    epoch the best weights are calibrated on ``valid_data`` (:func:`calibrate`;
    ``TrainResult.calibration``, the identity without ``valid_data``). ``test_data``: the best
    weights' calibrated metrics on it in ``TrainResult.test``.
    """
    eval_cfg = eval_cfg or EvaluateConfig()
    device = torch.device(device) if device is not None else resolve_device(cfg.use_gpu)
    autocast = autocast_for(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    loss = loss or build_loss(cfg, model.use_negative)
    if clip_features is not None:  # frozen features: R~ X precomputed (model.clip_inputs)
        clip_features = clip_inputs_for(model, clip_features.to(dtype=torch.float32),
                                        graph).to(device)
    task = FRAMETrainTask(model, loss, clip_features, graph).to_device(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    users, videos, watched = (torch.as_tensor(a, dtype=torch.long, device=device)
                              for a in (train_data.users, train_data.videos, train_data.watched))
    splits = {"valid": valid_data, "test": test_data}

    def batch(positions: np.ndarray) -> InteractionBatch:
        idx = torch.as_tensor(positions, device=device)
        return InteractionBatch(users[idx], videos[idx], watched[idx])

    def evaluate_split(split: str, calibration: Calibration | None = None) -> dict[str, float]:
        data = splits[split]
        return evaluate(model, clip_features, task.graph, data.users, data.videos, data.labels,
                        eval_cfg.ks, eval_cfg.batch_size, calibration=calibration)

    def calibrate_valid() -> tuple[Calibration, dict[str, float]]:
        return calibrate(model, clip_features, task.graph, valid_data.users, valid_data.videos,
                         valid_data.labels, eval_cfg.ks, eval_cfg.batch_size)

    def label_counts(split: str) -> tuple[int, int]:
        labels = np.asarray(splits[split].labels)
        return int(labels.size), int(labels.sum())

    hooks = LoopHooks(model=model, batch=batch,
                      step=torch_step(task, optimizer, autocast, cfg.grad_clip),
                      evaluate=evaluate_split, label_counts=label_counts,
                      begin_epoch=model.train,
                      optimizer_state_bytes=lambda: optimizer_state_bytes(optimizer), log=log,
                      calibrate=calibrate_valid)
    result = fit(hooks, cfg, len(train_data), validate=valid_data is not None,
                 test=test_data is not None)
    state = result.state
    return TrainResult(state.history, result.best_weights, state.best_epoch,
                       copy.deepcopy(result.valid), state.stopped_early, state,
                       result.test, result.calibration)
