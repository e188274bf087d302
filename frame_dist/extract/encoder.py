"""The frame encoder F_v: the ResNet-50 trunk (conv1 .. layer4) with global average pooling.

Paper section 3.1 ("visual-enhanced embedding layer"): a pre-trained ResNet-50 keeps its
convolutional trunk, adds global pooling, and a fully connected layer reduces the 2048-d vector
to d. The reduction is trained with FRAME, so extraction stores the 2048-d pooled vector of every
grid frame; the clip feature f_c (eq. 1) is later the mean of its grid frames' vectors.

Weights (``ExtractConfig.weights``):

- a torchvision enum name of ``ResNet50_Weights`` (``IMAGENET1K_V2``, ``IMAGENET1K_V1``,
  ``DEFAULT``): downloaded by torchvision into its cache (needs the internet once);
- a local state-dict file (``.pt`` / ``.pth``), loaded with ``weights_only=True``: a full
  resnet50 state dict (its ``fc.*`` entries are ignored) or a trunk-only one;
- ``random``: torchvision's initialisation under ``torch.manual_seed(weights_seed)``, for tests
  and demos without pretrained weights (deterministic on a given torch version).

Preprocessing: uint8 RGB frames (see :mod:`frame_dist.extract.video`) / 255, then ImageNet mean and
std.
On CUDA the trunk runs in channels_last under bf16 autocast; on CPU in float32. Features are
returned as float32 and stored as float16.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from feature_store.schemas import FEATURE_DIM
from frame_dist.config import ConfigError, ExtractConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCH = "torchvision.models.resnet50 trunk (conv1..layer4) + global average pooling"
PREPROCESSING = ("nearest frame to t_i=(i+0.5)*D/G; short side to image_size (bilinear), "
                 "centre crop; RGB/255; ImageNet mean/std")


class FrameEncoder(nn.Module):
    """F_v without its d-reduction: uint8 frames (B, H, W, 3) -> pooled features (B, 2048).

    Args:
        resnet (nn.Module): a torchvision ResNet-50 whose ``fc`` is replaced by ``nn.Identity``.

    Example::

        enc = FrameEncoder(build_resnet50_trunk("random", seed=0)).eval()
        feats = enc(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))  # (2, 2048)
    """

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet = resnet
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float32 (B, 2048)."""
        x = images.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W), channels_last strides
        x = (x - self.mean) / self.std  # torchvision's Normalize, same operations
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.resnet(x).float()  # (B, 2048)
        return self.resnet(x)  # (B, 2048)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray, batch_size: int) -> np.ndarray:
        """Encode uint8 frames (n, S, S, 3) in batches of ``batch_size``; float16 (n, 2048)."""
        device = self.mean.device
        out = np.empty((len(frames), FEATURE_DIM), np.float16)
        for lo in range(0, len(frames), batch_size):
            batch = torch.tensor(frames[lo:lo + batch_size])  # a copy: inputs may be read-only
            feats = self(batch.to(device, non_blocking=True))  # (b, 2048)
            out[lo:lo + len(batch)] = feats.to("cpu", torch.float16).numpy()
        return out


def _weights_kind(weights: str) -> str:
    if weights == "random":
        return "random"
    if weights.endswith((".pt", ".pth")) or os.sep in weights or os.path.exists(weights):
        return "file"
    return "torchvision"


def _torchvision_weights(name: str) -> torchvision.models.ResNet50_Weights:
    try:
        return torchvision.models.ResNet50_Weights[name]
    except KeyError:
        known = ", ".join(torchvision.models.ResNet50_Weights.__members__)
        raise ConfigError(f"extract.weights={name!r} is neither 'random', a .pt/.pth file, nor a "
                          f"torchvision ResNet50_Weights name ({known})") from None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"extract.weights={path!r}: state-dict file not found")


def encoder_identity(cfg: ExtractConfig) -> dict[str, Any]:
    """What makes two frame features comparable; stored in the frame-features manifest.

    Contains the architecture, the weights (torchvision name, ``sha256:<hex>`` of a local file,
    or ``random(seed=..)`` with the torch version), image size, grid size G, feature dimension
    and the preprocessing. Precision (float32 on CPU, bf16 autocast on GPU) is not part of it:
    it is recorded per part file instead.
    """
    kind = _weights_kind(cfg.weights)
    if kind == "random":
        weights = f"random(seed={cfg.weights_seed}, torch={torch.__version__.split('+')[0]})"
    elif kind == "file":
        _check_file(cfg.weights)
        weights = f"sha256:{file_sha256(cfg.weights)}"
    else:
        weights = _torchvision_weights(cfg.weights).name  # DEFAULT resolves to its real name
    return {
        "arch": ARCH,
        "weights": weights,
        "image_size": cfg.image_size,
        "grid_size": cfg.grid_size,
        "dim": FEATURE_DIM,
        "preprocessing": PREPROCESSING,
    }


def build_resnet50_trunk(weights: str, seed: int = 0) -> nn.Module:
    """A torchvision ResNet-50 with ``fc = Identity`` (output: pooled 2048-d), weights loaded."""
    kind = _weights_kind(weights)
    if kind == "random":
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            torch.manual_seed(seed)
            model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Identity()
        return model
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    if kind == "torchvision":
        state = _torchvision_weights(weights).get_state_dict(progress=False)
        source = f"torchvision {weights}"
    else:
        _check_file(weights)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ConfigError(f"extract.weights={weights!r}: not a loadable state dict "
                              f"({type(exc).__name__}: {exc})") from exc
        source = weights
    load_trunk_state(model, state, source)
    return model


def load_trunk_state(model: nn.Module, state: Any, source: str) -> None:
    """Load a resnet50 state dict into ``model`` (fc = Identity); ``fc.*`` entries are ignored.

    A ``module.`` prefix (DataParallel checkpoints) is stripped. Missing or unexpected keys, or
    shape mismatches, raise :class:`ConfigError` naming ``source`` and the first keys.
    """
    if not isinstance(state, dict):
        raise ConfigError(f"extract.weights={source!r}: expected a state dict, got "
                          f"{type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"extract.weights={source!r} is not a resnet50 state dict: "
                          f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} "
                          f"unexpected key(s) {unexpected[:3]}")
    bad = [k for k, v in state.items()
           if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape]
    if bad:
        k = bad[0]
        got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k])
        raise ConfigError(f"extract.weights={source!r}: {len(bad)} entr(y/ies) of the wrong "
                          f"shape, first {k}: {got} != {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when this process sees a GPU, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("extract.device='cuda' but no CUDA device is visible to this process")
    return torch.device(device)


def cpu_threads(encoder_threads: int, encoder_actors: int) -> int:
    """torch threads of a CPU encoder: the configured count, or this node's CPUs per actor."""
    if encoder_threads > 0:
        return encoder_threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, encoder_actors))


def load_encoder(cfg: ExtractConfig, device: str | torch.device = "cpu") -> FrameEncoder:
    """Build the encoder of ``cfg`` on ``device`` in eval mode (channels_last on CUDA)."""
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.encoder_threads, cfg.encoder_actors))
    encoder = FrameEncoder(build_resnet50_trunk(cfg.weights, cfg.weights_seed)).eval()
    encoder = encoder.to(device)
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels
    return encoder
