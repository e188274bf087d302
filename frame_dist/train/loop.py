"""The training loop of FRAME, shared by the single-process trainer and the Ray Train workers.

:func:`fit` owns what both must do alike: the epochs and their sampler (a permutation of
the N training interactions from ``default_rng([train.seed, epoch])``, cut into global
batches of B), the per-epoch history (:class:`EpochRecord`), early stopping on validation AUC
(the best AUC starts at -inf; ``train.patience`` epochs without a better one stop the run), the
best weights, their calibration (Platt scaling on the validation split, fitted once training
ends) and the final test pass with both. State in, state out (:class:`TrainState`), so
a Ray Train worker resumes mid-epoch from a checkpoint.

What differs comes in as :class:`LoopHooks`: how a process takes its part of a global batch, the
step (:func:`torch_step`: plain torch Adam; :func:`engine_step`: a DeepSpeed engine), the
evaluation (one process, or every worker's pairs gathered), the sums over workers, and the
checkpoint/report of a Ray Train worker.

Pure torch / numpy: no Ray, no DeepSpeed import (the engine is duck-typed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from frame_dist.config import TrainConfig
from frame_dist.model.calibration import Calibration
from frame_dist.model.loss import InteractionBatch
from frame_dist.train.artifacts import TrainState

LOSS_KEYS = ("loss", "pointwise", "pairwise", "l2")  # per interaction, in every EpochRecord
StepFn = Callable[[Any], dict[str, Tensor]]  # one batch: forward, backward, update -> stats


class SplitError(ValueError):
    """An evaluation split that cannot rank: empty, or only full watches / only skips."""


def check_split_labels(split: str, rows: int, positives: int, where: str = "train") -> None:
    """Refuse a validation split without both classes: its AUC, which early stopping compares,
    is undefined, and training would silently keep the first epoch's weights."""
    if rows == 0 or positives == 0 or positives == rows:
        raise SplitError(f"{where}: the validation set needs both full watches and skips to "
                         f"compute AUC for early stopping; split {split!r} has {rows} row(s), "
                         f"{positives} full watch(es) and {rows - positives} skip(s)")


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The global order of the training interactions in ``epoch`` (1-based), identical on every
    worker and on resume: ``default_rng([seed, epoch]).permutation(n)``, O(n) in any epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n_train: int, cfg: TrainConfig) -> int:
    """ceil(N / B) global batches, cut to ``train.steps_per_epoch`` when set."""
    steps = -(-n_train // cfg.batch_size)
    return min(steps, cfg.steps_per_epoch) if cfg.steps_per_epoch else steps


# --------------------------------------------------------------------------- steps


def torch_step(task: Callable[[Any], tuple[Tensor, dict[str, Tensor]]],
               optimizer: torch.optim.Optimizer,
               autocast: AbstractContextManager | None = None, grad_clip: float = 0.0
               ) -> StepFn:
    """One plain-torch step: zero the gradients, forward under ``autocast`` (fp32 outside it),
    backward, clip the gradient norm at ``grad_clip`` (0: off), ``optimizer.step()``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(batch: Any) -> dict[str, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with autocast if autocast is not None else contextlib.nullcontext():
            loss, stats = task(batch)
        loss.backward()  # outside autocast: gradients in the weights' dtype
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return stats

    return step


def engine_step(engine: Any, autocast: AbstractContextManager | None = None) -> StepFn:
    """One DeepSpeed step: forward under ``autocast``, ``engine.backward`` (gradient averaging
    over the workers), ``engine.step`` (clipping and Adam, as configured)."""

    def step(batch: Any) -> dict[str, Tensor]:
        with autocast if autocast is not None else contextlib.nullcontext():
            loss, stats = engine(batch)
        engine.backward(loss)
        engine.step()
        return stats

    return step


# --------------------------------------------------------------------------- measurements


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this process's optimizer state (Adam moments; ZeRO >= 1 holds only its part)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


def peak_rss_mb(world: int = 1) -> list[float]:
    """Peak resident memory of every process (MiB), gathered to all ranks when ``world`` > 1."""
    import resource

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    if world == 1:
        return [mine]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    """CPU copy of the model's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the loop


@dataclass
class EpochRecord:
    """One entry of the history (metrics.json's ``history``; the same keys on every path)."""

    epoch: int
    loss: float  # per training interaction, as eq. 16 (weighted parts below)
    pointwise: float
    pairwise: float
    l2: float
    seconds: float  # the epoch with its validation
    train_seconds: float  # its steps only
    steps: int  # steps run in this epoch (fewer after a mid-epoch resume)
    peak_rss_mb: list[float]  # peak resident memory of every process so far (MiB)
    propagation_bytes_per_step: float  # this process's collective payload (0: one process)
    optimizer_state_bytes: int  # this process's optimizer state
    valid: dict[str, float] | None = None  # validation metrics (absent without validation)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.valid is None:
            del out["valid"]
        return out


def _identity(x: Tensor) -> Tensor:
    return x


def _nothing() -> None:
    return None


def _zero() -> int:
    return 0


@dataclass
class LoopHooks:
    """What differs between the single-process trainer and a Ray Train worker."""

    model: nn.Module  # the weights being trained (best weights: CPU copies of its state)
    batch: Callable[[np.ndarray], InteractionBatch]  # this process's part of a global batch
    step: StepFn  # torch_step or engine_step
    # (split, calibration or None) -> metrics over every process's pairs, fp32 logits
    evaluate: Callable[[str, Calibration | None], dict[str, float]]
    label_counts: Callable[[str], tuple[int, int]]  # split -> (rows, full watches), all
    world: int = 1  # processes sharing each global batch
    all_reduce: Callable[[Tensor], Tensor] = _identity  # sum over the processes
    begin_epoch: Callable[[], None] = _nothing  # e.g. training mode, byte counters to zero
    sent_bytes: Callable[[], int] = _zero  # collective payload since begin_epoch
    optimizer_state_bytes: Callable[[], int] = _zero
    # checkpoint (and report): after every epoch and every train.checkpoint_every_steps steps
    save: Callable[[TrainState, dict[str, Tensor], dict[str, Any]], None] | None = None
    log: Callable[[str], None] | None = None
    # after the last epoch, on the best weights: Platt fit on the validation logits, and the
    # validation metrics under it (None: the identity, the best epoch's metrics)
    calibrate: Callable[[], tuple[Calibration, dict[str, float]]] | None = None


@dataclass
class FitResult:
    state: TrainState  # history, best epoch, counters
    best_weights: dict[str, Tensor]  # CPU state dict of the best epoch (loaded in the model)
    test: dict[str, float]  # the best weights on the test split ({}: no test pass)
    calibration: Calibration = dataclasses.field(default_factory=Calibration)
    valid: dict[str, float] = dataclasses.field(default_factory=dict)  # best weights, calibrated


def fit(hooks: LoopHooks, cfg: TrainConfig, n_train: int, state: TrainState | None = None,
        best_weights: dict[str, Tensor] | None = None, validate: bool = True,
        test: bool = False) -> FitResult:
    """Train from ``state`` (default: epoch 1) to the end; the model ends with the best weights.

    Every epoch: global batches of ``cfg.batch_size`` in the order of :func:`epoch_permutation`
    (at most :func:`steps_per_epoch`), then validation (``validate``). The best epoch is the one
    of the highest validation AUC (the last one without validation); ``cfg.patience`` epochs
    without a better AUC stop the run. Then, on the best weights, ``hooks.calibrate`` (with
    ``validate``) and ``test``: the best weights on the test split under that calibration ({}
    when that split cannot rank).
    """
    if n_train == 0:
        raise ValueError("train: no training interactions")
    if validate:  # a guard: the Ray driver refuses such a split before any worker starts
        check_split_labels("valid", *hooks.label_counts("valid"))
    state = state if state is not None else TrainState()
    best = best_weights if best_weights is not None else state_copy(hooks.model)
    device = next(hooks.model.parameters()).device
    steps, b = steps_per_epoch(n_train, cfg), cfg.batch_size
    while not state.done and state.epoch <= cfg.epochs:
        epoch, first = state.epoch, state.step
        order = epoch_permutation(cfg.seed, epoch, n_train)
        start = time.perf_counter()
        hooks.begin_epoch()
        totals = torch.zeros(len(LOSS_KEYS), device=device)  # sums of parts x interactions
        seen = 0
        for step in range(first, steps):
            positions = order[step * b:(step + 1) * b]
            stats = hooks.step(hooks.batch(positions))
            # each process's parts are over B / W interactions: x B / W, summed over processes
            totals += torch.stack([stats[k].float() for k in LOSS_KEYS]) * (
                len(positions) / hooks.world)
            seen += len(positions)
            state.step, state.global_step = step + 1, state.global_step + 1
            every = cfg.checkpoint_every_steps
            if hooks.save and every and state.global_step % every == 0 and step + 1 < steps:
                hooks.save(state, best, {"epoch": epoch, "global_step": state.global_step})
        sent = hooks.sent_bytes()
        train_seconds = time.perf_counter() - start
        totals = hooks.all_reduce(totals)
        valid = hooks.evaluate("valid", None) if validate else None
        ran = steps - first
        record = EpochRecord(epoch=epoch, **{k: float(v) / max(seen, 1)
                                             for k, v in zip(LOSS_KEYS, totals.tolist())},
                             seconds=time.perf_counter() - start, train_seconds=train_seconds,
                             steps=ran, peak_rss_mb=peak_rss_mb(hooks.world),
                             propagation_bytes_per_step=sent / max(ran, 1),
                             optimizer_state_bytes=hooks.optimizer_state_bytes(), valid=valid)
        state.history.append(record.to_dict())
        if valid is None:
            state.best_epoch, best = epoch, state_copy(hooks.model)
        elif valid["auc"] > state.best_auc:
            state.best_auc, state.best_epoch, state.stale = valid["auc"], epoch, 0
            best = state_copy(hooks.model)
        else:
            state.stale += 1
        state.epoch, state.step = epoch + 1, 0
        state.stopped_early = validate and state.stale >= cfg.patience
        state.done = state.stopped_early or epoch >= cfg.epochs
        if hooks.log is not None:
            hooks.log(_epoch_line(record))
        if hooks.save:
            hooks.save(state, best, {"epoch": epoch, "global_step": state.global_step,
                                     "loss": record.loss,
                                     **{f"valid_{k}": v for k, v in (valid or {}).items()}})

    hooks.model.load_state_dict(best)
    calibration, valid_metrics = Calibration(), dict(state.best_valid)
    if validate and hooks.calibrate is not None:
        calibration, valid_metrics = hooks.calibrate()
    test_metrics: dict[str, float] = {}
    if test:
        rows, positives = hooks.label_counts("test")
        if 0 < positives < rows:
            test_metrics = hooks.evaluate("test", calibration)
        elif hooks.log is not None:
            hooks.log(f"test split: {rows} row(s), {positives} full watch(es): nothing to rank")
    return FitResult(state, best, test_metrics, calibration, valid_metrics)


def _epoch_line(r: EpochRecord) -> str:
    valid = (f", valid auc {r.valid['auc']:.4f} logloss {r.valid['logloss']:.4f}"
             if r.valid else "")
    return (f"epoch {r.epoch}: loss {r.loss:.4f} (point {r.pointwise:.4f}, pair "
            f"{r.pairwise:.4f}){valid}, {r.train_seconds:.1f}s")
