"""Read torch files from a store without executing code.

``torch.load(weights_only=True)`` unpickles tensors, containers and primitive types only; a
file that needs anything else (a pickle whose ``__reduce__`` runs a command, a class outside the
allow-list) is refused with :class:`UnsafeCheckpointError` naming the file. DeepSpeed loads its
own checkpoint files with ``weights_only=False``; :func:`use_safe_loading` swaps the engine's
checkpoint engine for one that loads through :func:`safe_load`, whose allow-list is the few
plain DeepSpeed types its checkpoints hold (ZeRO stage enum, loss scalers, fragment addresses).
"""

from __future__ import annotations

import pickle
from typing import IO, Any

import torch


class UnsafeCheckpointError(RuntimeError):
    """A file read back from a store would need unsafe unpickling (or is not a torch file)."""


def deepspeed_safe_globals() -> list[type]:
    """The DeepSpeed classes its checkpoints pickle: plain data holders, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(source: str | IO[bytes], name: str, map_location: Any = "cpu",
              allow: list[type] | None = None) -> Any:
    """``torch.load(source, weights_only=True)`` with ``allow`` as extra safe globals; a file
    that needs more is refused naming ``name`` (its path or URI in the store)."""
    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()
                       if "Unsupported" in line or "GLOBAL" in line), str(exc).splitlines()[0])
        raise UnsafeCheckpointError(
            f"{name}: refused to load: it needs unpickling beyond tensors and plain data, which "
            f"could run code planted in the store ({detail[:300]}). If you wrote this file "
            "yourself with another tool, re-save it as a plain state dict.") from exc


def use_safe_loading(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`safe_load`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, path, map_location, deepspeed_safe_globals())

    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
