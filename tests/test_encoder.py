"""The ResNet-50 trunk encoder: weights sources, preprocessing, identity, batching."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torchvision

from frame_dist.config import ConfigError, ExtractConfig
from frame_dist.extract.encoder import (
    FrameEncoder,
    build_resnet50_trunk,
    cpu_threads,
    encoder_identity,
    load_encoder,
    resolve_device,
)

SIZE = 32  # smallest input ResNet-50 accepts: fast on CPU


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)


def random_resnet50(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None)


def reference_features(model: torch.nn.Module, frames: np.ndarray) -> torch.Tensor:
    """torchvision's own ResNet-50 up to avgpool on ImageNet-normalised inputs."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x = torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(x)
    trunk = torch.nn.Sequential(*list(model.children())[:-1]).eval()
    with torch.inference_mode():
        return trunk(x).flatten(1)


@pytest.fixture(scope="module")
def seed3_reference(frames) -> torch.Tensor:
    return reference_features(random_resnet50(3), frames)


def test_random_weights_match_torchvision_trunk(frames, seed3_reference):
    enc = FrameEncoder(build_resnet50_trunk("random", seed=3)).eval()
    with torch.inference_mode():
        out = enc(torch.from_numpy(frames))
    assert out.shape == (5, 2048) and out.dtype == torch.float32
    torch.testing.assert_close(out, seed3_reference, rtol=1e-5, atol=1e-5)


def test_random_weights_are_seeded_and_leave_global_rng_alone(frames):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = FrameEncoder(build_resnet50_trunk("random", seed=0)).eval()
    after = torch.rand(1)
    assert torch.equal(before, after)  # building the encoder did not consume the caller's RNG
    b = FrameEncoder(build_resnet50_trunk("random", seed=0)).eval()
    c = FrameEncoder(build_resnet50_trunk("random", seed=1)).eval()
    x = torch.from_numpy(frames)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
        assert not torch.allclose(a(x), c(x))


@pytest.mark.parametrize("variant", ["full", "trunk_only", "module_prefix"])
def test_state_dict_file_gives_the_same_features(variant, tmp_path, frames, seed3_reference):
    state = random_resnet50(3).state_dict()
    if variant == "trunk_only":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if variant == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "resnet50.pt"
    torch.save(state, path)
    enc = load_encoder(ExtractConfig(weights=str(path), image_size=SIZE))
    feats = enc.encode(frames, batch_size=2)
    assert feats.dtype == np.float16 and feats.shape == (5, 2048)
    np.testing.assert_allclose(feats.astype(np.float32), seed3_reference.numpy(), rtol=1e-3,
                               atol=1e-3)


def test_torchvision_weights_name_uses_the_real_loader(tmp_path, monkeypatch, frames,
                                                       seed3_reference):
    # torchvision loads IMAGENET1K_V2 from $TORCH_HOME/hub/checkpoints when the file is there
    # (no hash check), so this exercises the download code path without the internet.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    torch.save(random_resnet50(3).state_dict(),
               tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    enc = FrameEncoder(build_resnet50_trunk("IMAGENET1K_V2")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(enc(torch.from_numpy(frames)), seed3_reference,
                                   rtol=1e-5, atol=1e-5)


def test_encode_batches_match_one_forward(frames):
    enc = load_encoder(ExtractConfig(weights="random", image_size=SIZE))
    with torch.inference_mode():
        whole = enc(torch.from_numpy(frames)).numpy()
    for batch_size in (1, 2, 64):
        np.testing.assert_allclose(enc.encode(frames, batch_size).astype(np.float32), whole,
                                   rtol=2e-3, atol=2e-3)
    readonly = frames.copy()
    readonly.setflags(write=False)  # what Ray hands over from the object store
    np.testing.assert_array_equal(enc.encode(readonly, 2), enc.encode(frames, 2))


def test_identity_records_weights_and_sizes(tmp_path):
    ident = encoder_identity(ExtractConfig(weights="random", weights_seed=7, image_size=64,
                                           grid_size=8))
    assert ident["weights"] == f"random(seed=7, torch={torch.__version__.split('+')[0]})"
    assert (ident["image_size"], ident["grid_size"], ident["dim"]) == (64, 8, 2048)
    assert "ImageNet mean/std" in ident["preprocessing"]
    path = tmp_path / "w.pth"
    path.write_bytes(b"some bytes")
    ident = encoder_identity(ExtractConfig(weights=str(path)))
    assert ident["weights"] == "sha256:" + hashlib.sha256(b"some bytes").hexdigest()
    assert encoder_identity(ExtractConfig(weights="DEFAULT"))["weights"] == "IMAGENET1K_V2"


@pytest.mark.parametrize("content,message", [
    (None, "state-dict file not found"),
    (b"definitely not a checkpoint", "not a loadable state dict"),
    (torch.zeros(3), "expected a state dict, got Tensor"),
    ({"conv1.weight": torch.zeros(64, 3, 7, 7)},
     "is not a resnet50 state dict: 317 missing key(s) ['bn1.bias'"),
    ("wrong_shape", "entr(y/ies) of the wrong shape, first conv1.weight: (64, 3, 3, 3)"),
])
def test_bad_weight_files_are_refused(content, message, tmp_path):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "wrong_shape":
        state = torchvision.models.resnet50().state_dict()
        state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
        torch.save(state, path)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError) as info:
        build_resnet50_trunk(str(path))
    assert message in str(info.value)
    assert f"extract.weights='{path}'" in str(info.value)


def test_unknown_weights_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"extract.weights='IMAGENET2K' is neither .*"
                                          r"IMAGENET1K_V1, IMAGENET1K_V2"):
        encoder_identity(ExtractConfig(weights="IMAGENET2K"))


def test_devices_and_threads():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="extract.device='cuda' but no CUDA device"):
            resolve_device("cuda")
    assert cpu_threads(3, 1) == 3
    assert cpu_threads(0, 10_000) == 1
    assert cpu_threads(0, 1) >= 1
