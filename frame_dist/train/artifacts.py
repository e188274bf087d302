"""What a training run leaves in the store: one typed reader and one writer per file.

Everything of run ``<name>`` lives under :func:`run_dir` = ``runs/<name>`` (Ray Train's storage
for the run too):

* ``run.json`` (:class:`RunClaim`): which inputs and settings own the run (its fingerprint) and
  the config that claimed it; a relaunch with other ones is refused.
* Ray Train checkpoints (:class:`Checkpoint`): the DeepSpeed engine's state under the tag
  :data:`STATE_TAG` with the loop's :class:`TrainState` as its client state, and the best
  weights so far in :data:`BEST_FILE`.
* ``metrics.json`` (:class:`RunMetrics`): test and validation metrics of the best weights
  (calibrated), their calibration, the per-epoch history, step counters.
* ``model.pt`` (:class:`SavedModel`): model arguments, best weights, their calibration (Platt
  scaling, ``frame_dist.model.calibration``) and the training config; loadable with
  ``torch.load(weights_only=True)``, so FRAME is rebuilt from this file alone.

* ``model_card.md`` (:class:`ModelCard`): a Hugging Face style card beside model.pt (YAML
  header: model, N_c, data fingerprint, metrics; the command that trains the run again),
  written by the train stage and again by the evaluate stage with the oracle's metrics.

Plus ``config.yaml`` (the config as YAML, for people) and the evaluate stage's
``evaluation.json`` and report (:func:`run_path` names them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import numbers
import os
import shlex
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import Tensor

from feature_store.store import Store, StoreError
from frame_dist.model.calibration import Calibration
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

    test: dict[str, float]  # metrics of the best weights on the test split, calibrated
    best_epoch: int
    valid: dict[str, float]  # validation metrics of the best weights, calibrated
    global_step: int
    epochs_run: int
    resumed_at_steps: list[int]
    history: list[dict[str, Any]]  # one loop.EpochRecord dict per epoch (before calibration)
    n_clips: int
    workers: int
    fingerprint: str
    calibration: Calibration = field(default_factory=Calibration)  # as in model.pt

    FILE = "metrics.json"

    @classmethod
    def from_state(cls, state: TrainState, test: dict[str, float], n_clips: int,
                   workers: int, calibration: Calibration | None = None,
                   valid: dict[str, float] | None = None) -> RunMetrics:
        """``valid``: the best weights' calibrated validation metrics (default: the best
        epoch's, uncalibrated)."""
        return cls(test=test, best_epoch=state.best_epoch,
                   valid=state.best_valid if valid is None else valid,
                   global_step=state.global_step, epochs_run=len(state.history),
                   resumed_at_steps=list(state.resumes), history=state.history,
                   n_clips=n_clips, workers=workers, fingerprint=state.fingerprint,
                   calibration=calibration or Calibration())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # calibration as {"a": ..., "b": ...}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunMetrics:
        """The file's content; a run from before calibration reads as the identity."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"calibration"})
        if missing:
            raise StoreError(f"metrics.json lacks {missing}: written by an older frame-dist? "
                             "Train the run again")
        calibration = Calibration.from_dict(data.get("calibration"), "metrics.json")
        return cls(**{k: data[k] for k in names - {"calibration"}}, calibration=calibration)

    @classmethod
    def read(cls, store: Store, run_name: str) -> RunMetrics | None:
        path = run_path(run_name, cls.FILE)
        return cls.from_dict(store.read_json(path)) if store.exists(path) else None

    def write(self, store: Store, run_name: str) -> None:
        store.write_json(run_path(run_name, self.FILE), self.to_dict())


# --------------------------------------------------------------------------- model.pt


@dataclass
class SavedModel:
    """``model.pt``: FRAME's constructor arguments, its weights, their calibration and the
    config that trained it.

    Plain tensors, dicts and scalars only, so ``torch.load(weights_only=True)`` reads it. A file
    without ``calibration`` (a run from before it) reads as the identity, p = sigmoid(y).
    """

    model_args: dict[str, Any]
    state_dict: dict[str, Tensor]
    config: dict[str, Any]  # Config.to_dict() of the training run
    sha256: str = ""  # of the file's bytes (set by :meth:`read`): the model's identity
    calibration: Calibration = field(default_factory=Calibration)  # P = sigmoid(a y + b)

    FILE = "model.pt"

    @classmethod
    def from_model(cls, model: FRAME, config: dict[str, Any],
                   calibration: Calibration | None = None) -> SavedModel:
        return cls(model.model_args(), {k: v.cpu() for k, v in model.state_dict().items()},
                   config, calibration=calibration or Calibration())

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
                    "config": self.config, "calibration": self.calibration.to_dict()}, buffer)
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
        calibration = Calibration.from_dict(saved.get("calibration"), store.uri(path))
        return cls(saved["model_args"], saved["state_dict"], saved["config"],
                   sha256=hashlib.sha256(data).hexdigest(), calibration=calibration)


# --------------------------------------------------------------------------- model_card.md

NOT_MEASURED = "not measured"
COUNT_KEYS = ("n", "positives", "ranked_users")  # metric dicts' counts, not metrics
TRAIN_FIELDS = ("epochs", "batch_size", "lr", "alpha", "beta", "l2", "grad_clip", "seed",
                "workers", "zero_stage", "precision", "patience")  # shown beside the model's


@dataclass
class ModelCard:
    """``model_card.md``: the model, the data it saw, how well it does, how to train it again.

    Hugging Face style: a YAML header between ``---`` lines (:meth:`parse_header`) carrying
    ``model_name``, ``run_name``, ``n_clips``, ``data_fingerprint`` (the graph's
    ``GraphManifest.fingerprint``), ``run_fingerprint``, ``model_config``, ``metrics`` (``model``,
    ``oracle``, ``baselines``: a {metric: value} mapping, or "not measured"), ``calibration``
    (``{a, b}``: P(full watch) = sigmoid(a y + b)) and ``reproduce`` (a ``python -m
    jobs.pipeline`` line), then markdown for people. The train stage writes it
    beside model.pt with metrics.json's test metrics; the evaluate stage writes it again with
    evaluation.json's (the model's and, where the data has a truth, the oracle's).
    """

    run_name: str
    config: dict[str, Any]  # Config.to_dict() of the training run
    data_fingerprint: str  # of the graph trained on ("" when no graph is committed)
    metrics: RunMetrics | None  # metrics.json, if written
    evaluation: dict[str, Any] | None = None  # evaluation.json, once the evaluate stage ran
    config_uri: str = ""  # the run's config.yaml as a user can paste it (Store.uri)

    FILE = "model_card.md"

    @classmethod
    def for_run(cls, store: Store, run_name: str, config: dict[str, Any] | None = None,
                evaluation: dict[str, Any] | None = None) -> ModelCard:
        """The card of a run from its files: ``config`` (default: the run's config.yaml),
        metrics.json, the committed graph of its N_c and ``evaluation`` (evaluation.json)."""
        from frame_dist.graph.manifest import GraphManifest

        if config is None:  # config.yaml, else (a run from before it existed) model.pt's
            path = run_path(run_name, "config.yaml")
            config = (yaml.safe_load(store.read_bytes(path)) if store.exists(path)
                      else SavedModel.read(store, run_name).config)
        manifest = GraphManifest.read(store, int(config["graph"]["n_clips"]))
        return cls(run_name, config, manifest.fingerprint if manifest else "",
                   RunMetrics.read(store, run_name), evaluation,
                   store.uri(run_path(run_name, "config.yaml")))

    def header(self) -> dict[str, Any]:
        """The YAML header: what tools and people read without parsing the markdown."""
        return _plain({
            "model_name": "FRAME",
            "library_name": "frame-dist",
            "tags": ["recommendation", "micro-video", "frame", "sigir-2023"],
            "run_name": self.run_name,
            "n_clips": int(self.config["graph"]["n_clips"]),
            "data_fingerprint": self.data_fingerprint or "unknown",
            "run_fingerprint": self.metrics.fingerprint if self.metrics else "unknown",
            "model_config": self.config["model"],
            "metrics": {"source": self._source(), "model": self._model_metrics(),
                        "oracle": (self.evaluation or {}).get("oracle", NOT_MEASURED),
                        "baselines": self._best_baseline()},
            "calibration": self._calibration(),
            "reproduce": reproduce_command(self.config),
        })

    def _best_baseline(self) -> dict[str, Any] | str:
        """The evaluate stage's best counting baseline (by test AUC), with its name."""
        found = (self.evaluation or {}).get("baselines")
        if not isinstance(found, dict) or not found:
            return NOT_MEASURED
        name, metrics = max(found.items(), key=lambda item: item[1]["auc"])
        return {"name": name, **metrics}

    def _calibration(self) -> dict[str, float] | str:
        if self.evaluation is not None and "calibration" in self.evaluation:
            return self.evaluation["calibration"]
        return self.metrics.calibration.to_dict() if self.metrics else NOT_MEASURED

    def _source(self) -> str:
        if self.evaluation is not None:
            return "evaluation.json (evaluate stage)"
        if self._model_metrics() == NOT_MEASURED:
            return NOT_MEASURED
        return "metrics.json (train stage)"

    def _model_metrics(self) -> dict[str, Any] | str:
        if self.evaluation is not None:
            return self.evaluation["model"]
        return self.metrics.test if self.metrics and self.metrics.test else NOT_MEASURED

    def render(self) -> str:
        head = self.header()
        cfg, metrics = self.config, head["metrics"]
        oracle_why = ("the evaluate stage has not run yet" if self.evaluation is None else
                      "the data has no truth: set ingest.truth_column where it carries one")
        config_file = shlex.quote(self.config_uri or f"<store>/runs/{self.run_name}/config.yaml")
        lines = [
            "---", yaml.safe_dump(head, sort_keys=False).rstrip(), "---", "",
            f"# FRAME: run `{self.run_name}`", "",
            "FRAME (SIGIR 2023) recommends micro-videos from clip-level user interest: each "
            f"video is cut into N_c = {head['n_clips']} clips, and users and clips are linked "
            "in a positive graph (clips watched to the end) and a negative graph (the clip "
            "where the user skipped). Trained with frame-dist (Ray Train + DeepSpeed).", "",
            "## Data", "",
            f"- data fingerprint (the graph trained on): `{head['data_fingerprint']}`",
            f"- N_c: {head['n_clips']} clips per video; positives: "
            f"`{cfg['graph']['positives']}`; {cfg['graph']['n_shards']} graph shard(s)",
            f"- interactions: {_source_of(cfg)}",
            f"- run fingerprint (graph + model and train settings): "
            f"`{head['run_fingerprint']}`", "",
            "## Model configuration", "",
            "| field | value |", "|---|---|",
            *[f"| model.{k} | {v} |" for k, v in cfg["model"].items()],
            *[f"| train.{k} | {cfg['train'][k]} |" for k in TRAIN_FIELDS if k in cfg["train"]],
            "",
            "## Metrics", "",
            f"Test split; source: {metrics['source']}. The oracle scores the true full-watch "
            "probabilities (the ceiling on this data); the baseline row is the best of a "
            "constant, the smoothed per-user and the per-video full-watch rate on the same split "
            "(benchmarks/quality.py adds trained baselines).", "",
            *_metrics_table(metrics, oracle_why), "",
            _calibration_line(head["calibration"]), "",
            "## Reproduce", "",
            "```bash", head["reproduce"], "```", "",
            "or with the run's resolved config (copy it first when the store is on S3):", "",
            "```bash", f"python -m jobs.pipeline --config {config_file}", "```", "",
            "## Use", "",
            "```python",
            "from feature_store.store import Store",
            "from frame_dist.train.artifacts import SavedModel",
            f"model = SavedModel.read(Store({cfg['store']['root']!r}), {self.run_name!r})"
            ".build()",
            "```", "",
        ]
        return "\n".join(lines)

    def write(self, store: Store) -> None:
        store.write_text(run_path(self.run_name, self.FILE), self.render())

    @staticmethod
    def parse_header(text: str) -> dict[str, Any]:
        """The YAML header of a card's text (``yaml.safe_load``)."""
        first, sep, rest = text.partition("\n")
        end = rest.find("\n---\n")
        if first != "---" or not sep or end < 0:
            raise StoreError("model card: no YAML header between '---' lines")
        return yaml.safe_load(rest[:end])

    @classmethod
    def read_header(cls, store: Store, run_name: str) -> dict[str, Any] | None:
        path = run_path(run_name, cls.FILE)
        return cls.parse_header(store.read_bytes(path).decode()) if store.exists(path) else None


def reproduce_command(config: dict[str, Any]) -> str:
    """``python -m jobs.pipeline`` with an override for every setting that differs from the
    defaults: loading those overrides gives ``config`` back, but for

    * a synthetic-world run: ``world.preset`` and ``world.seed`` always, never the world's
      generated files (``ingest.interactions`` / ``ingest.videos``, which the pipeline points at
      them): the command generates the same world;
    * the tracking section: where results are logged, not what they are.
    """
    from frame_dist.config import load_config
    from frame_dist.ingest.world import from_world

    defaults = load_config(None, []).to_dict()
    world = from_world(config)
    keep = {("world", "preset"), ("world", "seed")} if world else set()
    generated = {("ingest", "interactions"), ("ingest", "videos")} if world else set()
    args = [shlex.quote(f"{section}.{name}={_yaml_scalar(value)}")
            for section, fields in config.items() if section != "tracking"
            for name, value in fields.items()
            if (section, name) not in generated
            and ((section, name) in keep or value != defaults.get(section, {}).get(name))]
    return " ".join(["python -m jobs.pipeline", *args])


def _yaml_scalar(value: Any) -> str:
    """``value`` as one line of YAML, as ``key=value`` overrides parse it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n...\n").strip()


def _source_of(cfg: dict[str, Any]) -> str:
    from frame_dist.ingest.world import from_world

    ingest = cfg["ingest"]
    if from_world(cfg):
        return f"the synthetic world (preset {cfg['world']['preset']}, seed {cfg['world']['seed']})"
    truth = f", truth column `{ingest['truth_column']}`" if ingest.get("truth_column") else ""
    return f"`{ingest['interactions']}` (preset `{ingest['preset']}`{truth})"


def _calibration_line(calibration: dict[str, float] | str) -> str:
    if not isinstance(calibration, dict):
        return f"Calibration: {NOT_MEASURED}."
    return (f"Probabilities: P(full watch) = sigmoid(a y + b) of the model's logit y, a = "
            f"{calibration['a']:.4g}, b = {calibration['b']:.4g} (Platt scaling on the validation "
            "split); `logloss` scores them, `logloss_raw` scores sigmoid(y).")


def _metrics_table(metrics: dict[str, Any], oracle_why: str) -> list[str]:
    measured = [m for m in (metrics["model"], metrics["oracle"]) if isinstance(m, dict)]
    names = [k for k in (measured[0] if measured else {}) if k not in COUNT_KEYS]
    if not names:
        return [f"model: {NOT_MEASURED}; oracle: {NOT_MEASURED} ({oracle_why}); baselines: "
                f"{NOT_MEASURED}."]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for who, why in (("model", ""), ("oracle", f" ({oracle_why})"), ("baselines", "")):
        row = metrics[who]
        if who == "baselines" and isinstance(row, dict):
            who = f"best baseline ({row['name']})"
        cells = ([f"{row[k]:.4f}" if k in row else "-" for k in names] if isinstance(row, dict)
                 else [NOT_MEASURED + why] + [""] * (len(names) - 1))
        lines.append(f"| {who} | " + " | ".join(cells) + " |")
    return lines


def _plain(value: Any) -> Any:
    """Python builtins only (numpy scalars, tuples -> float, int, list), for yaml.safe_dump."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value
