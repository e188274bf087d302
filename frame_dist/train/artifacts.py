"""What a training run leaves in the store: one typed reader and one writer per file.

Everything of run ``<name>`` lives under :func:`run_dir` = ``runs/<name>`` (Ray Train's storage
for the run too):

* ``run.json`` (:class:`RunClaim`): which inputs and settings own the run (its fingerprint) and
  the config that claimed it; a relaunch with other ones is refused.
* Ray Train checkpoints (:class:`Checkpoint`): the DeepSpeed engine's state under the tag
  :data:`STATE_TAG` with the loop's :class:`TrainState` as its client state, and the best
  weights so far in :data:`BEST_FILE`.
* ``metrics.json`` (:class:`RunMetrics`): test metrics of the best weights, the per-epoch
  history, step counters.
* ``model.pt`` (:class:`SavedModel`): model arguments, best weights and the training config;
  loadable with ``torch.load(weights_only=True)``, so FRAME is rebuilt from this file alone.

Plus ``config.yaml`` (the config as YAML, for people) and the evaluate stage's
``evaluation.json`` and report (:func:`run_path` names them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from feature_store.store import Store, StoreError
from frame_dist.model.frame import FRAME
from frame_dist.train.safe_load import safe_load

RUNS = "runs"  # the store folder of all runs (Ray Train storage path)
STATE_TAG = "state"  # DeepSpeed checkpoint tag inside each Ray Train checkpoint
BEST_FILE = "best_model.pt"  # best weights so far, inside each Ray Train checkpoint
CLIENT_KEY = "frame"  # our key in the DeepSpeed checkpoint's client state


def run_dir(run_name: str) -> str:
    """The store folder of run ``run_name``: ``runs/<run_name>`` (the one definition)."""
    return f"{RUNS}/{run_name}"


def run_path(run_name: str, name: str) -> str:
    """File ``name`` of run ``run_name`` (relative to the store)."""
    return f"{run_dir(run_name)}/{name}"


# --------------------------------------------------------------------------- run.json


@dataclass
class RunClaim:
    """``run.json``: the identity (fingerprint) of the inputs and settings owning a run."""

    fingerprint: str
    config: dict[str, Any]  # Config.to_dict() of the launch that claimed the run

    FILE = "run.json"

    @classmethod
    def read(cls, store: Store, run_name: str) -> RunClaim | None:
        path = run_path(run_name, cls.FILE)
        if not store.exists(path):
            return None
        data = store.read_json(path)
        return cls(fingerprint=data.get("fingerprint", ""), config=data.get("config", {}))

    def write(self, store: Store, run_name: str) -> None:
        store.write_json(run_path(run_name, self.FILE),
                         {"fingerprint": self.fingerprint, "config": self.config})


# --------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    """Where a run stands after each step: the training loop's resume state (state in, state
    out of ``frame_dist.train.loop.fit``) and a checkpoint's client state.

    ``epoch``/``step``: the next step to run (1-based epoch, 0-based step within it).
    ``best_auc`` starts at -inf: the first validated epoch is always the best so far.
    """

    epoch: int = 1
    step: int = 0
    global_step: int = 0
    best_auc: float = -math.inf
    best_epoch: int = 0  # 0: no epoch finished yet
    stale: int = 0  # epochs since the best validation AUC (early stopping)
    done: bool = False
    stopped_early: bool = False  # done because ``stale`` reached train.patience
    history: list[dict[str, Any]] = field(default_factory=list)  # loop.EpochRecord dicts
    resumes: list[int] = field(default_factory=list)  # global step of every resume
    fingerprint: str = ""  # the run's (RunClaim.fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def best_valid(self) -> dict[str, float]:
        """Validation metrics of the best epoch ({} before one, or without validation)."""
        if not self.best_epoch:
            return {}
        return self.history[self.best_epoch - 1].get("valid", {})


@dataclass
class Checkpoint:
    """The loop's part of a Ray Train checkpoint: the client state DeepSpeed stores beside the
    engine's own, and the best weights file (written by rank 0)."""

    state: TrainState
    best_weights: dict[str, Tensor]  # CPU state dict

    def client_state(self) -> dict[str, Any]:
        """What ``engine.save_checkpoint(client_state=...)`` stores."""
        return {CLIENT_KEY: self.state.to_dict()}

    def write_weights(self, directory: str) -> None:
        torch.save(self.best_weights, os.path.join(directory, BEST_FILE))

    @classmethod
    def read(cls, directory: str, client_state: dict[str, Any] | None) -> Checkpoint:
        """From a checkpoint folder and the client state ``engine.load_checkpoint`` returned."""
        if CLIENT_KEY not in (client_state or {}):
            raise RuntimeError(f"checkpoint {directory} holds no training state; refusing to "
                               "restart the run from scratch")
        best = safe_load(os.path.join(directory, BEST_FILE), os.path.join(directory, BEST_FILE))
        return cls(TrainState.from_dict(client_state[CLIENT_KEY]), best)


# --------------------------------------------------------------------------- metrics.json


@dataclass
class RunMetrics:
    """``metrics.json``: what a finished run measured (the keys are the file's)."""

    test: dict[str, float]  # metrics of the best weights on the test split
    best_epoch: int
    valid: dict[str, float]  # validation metrics of the best epoch
    global_step: int
    epochs_run: int
    resumed_at_steps: list[int]
    history: list[dict[str, Any]]  # one loop.EpochRecord dict per epoch
    n_clips: int
    workers: int
    fingerprint: str

    FILE = "metrics.json"

    @classmethod
    def from_state(cls, state: TrainState, test: dict[str, float], n_clips: int,
                   workers: int) -> RunMetrics:
        return cls(test=test, best_epoch=state.best_epoch, valid=state.best_valid,
                   global_step=state.global_step, epochs_run=len(state.history),
                   resumed_at_steps=list(state.resumes), history=state.history,
                   n_clips=n_clips, workers=workers, fingerprint=state.fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunMetrics:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise StoreError(f"metrics.json lacks {missing}: written by an older frame-dist? "
                             "Train the run again")
        return cls(**{k: data[k] for k in names})

    @classmethod
    def read(cls, store: Store, run_name: str) -> RunMetrics | None:
        path = run_path(run_name, cls.FILE)
        return cls.from_dict(store.read_json(path)) if store.exists(path) else None

    def write(self, store: Store, run_name: str) -> None:
        store.write_json(run_path(run_name, self.FILE), self.to_dict())


# --------------------------------------------------------------------------- model.pt


@dataclass
class SavedModel:
    """``model.pt``: FRAME's constructor arguments, its weights and the config that trained it.

    Plain tensors, dicts and scalars only, so ``torch.load(weights_only=True)`` reads it.
    """

    model_args: dict[str, Any]
    state_dict: dict[str, Tensor]
    config: dict[str, Any]  # Config.to_dict() of the training run
    sha256: str = ""  # of the file's bytes (set by :meth:`read`): the model's identity

    FILE = "model.pt"

    @classmethod
    def from_model(cls, model: FRAME, config: dict[str, Any]) -> SavedModel:
        return cls(model.model_args(), {k: v.cpu() for k, v in model.state_dict().items()},
                   config)

    @property
    def n_clips(self) -> int:
        """N_c of the graph the model was trained on."""
        return int(self.config["graph"]["n_clips"])

    def build(self) -> FRAME:
        """FRAME from the arguments and weights, in eval mode."""
        model = FRAME(**self.model_args)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model_args": self.model_args, "state_dict": self.state_dict,
                    "config": self.config}, buffer)
        return buffer.getvalue()

    def write(self, store: Store, run_name: str) -> None:
        store.write_bytes_atomic(run_path(run_name, self.FILE), self.to_bytes())

    @classmethod
    def read(cls, store: Store, run_name: str) -> SavedModel:
        path = run_path(run_name, cls.FILE)
        if not store.exists(path):
            raise StoreError(f"no trained model at {store.uri(path)}: run the train stage first "
                             f"(train.run_name={run_name})")
        data = store.read_bytes(path)
        saved = safe_load(io.BytesIO(data), store.uri(path))
        return cls(saved["model_args"], saved["state_dict"], saved["config"],
                   sha256=hashlib.sha256(data).hexdigest())
