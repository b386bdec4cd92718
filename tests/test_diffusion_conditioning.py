"""Condition assembly, augmentation and settings of the diffusion model (no training)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from histopipe.config import load_config
from histopipe.diffusion.augment import augment_batch, flip_rotate, hed_jitter, transform_boxes
from histopipe.diffusion.conditioning import (
    ConditionEncoder,
    CropTokenEncoder,
    PlacedCrop,
    box_masks,
    slots_from_image,
    slots_from_placed,
)
from histopipe.diffusion.crop_features import CropFeaturizer
from histopipe.diffusion.models import Denoiser, build_denoiser, build_vae
from histopipe.diffusion.settings import LDMSettings, SynthesisSettings, VAESettings, ldm_settings
from histopipe.errors import ConfigError, HistopipeError
from tests.diffusion_helpers import one_thread, tiny_ldm, tiny_vae  # noqa: F401 (autouse fixture)


def _batch(b=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    maps = torch.randint(0, 4, (b, size, size), generator=g)
    boxes = torch.tensor([[[0, 0, 4], [8, 6, 5], [0, 0, 0]]] * b)
    labels = torch.tensor([[1, 2, 0]] * b)
    valid = torch.tensor([[True, True, False]] * b)
    return images, maps, boxes, labels, valid


def test_settings_defaults_match_schema():
    cfg = load_config()
    for name, cls in (("vae", VAESettings), ("ldm", LDMSettings), ("synthesis", SynthesisSettings)):
        built = dataclasses.asdict(cls(**cfg[name]))
        plain = dataclasses.asdict(cls())
        assert built == plain, name
    with pytest.raises(ConfigError, match="norm_num_groups"):
        ldm_settings(load_config(overrides={"ldm": {"block_out_channels": [48, 64]}}))
    with pytest.raises(ConfigError, match="until_step"):
        LDMSettings(curriculum=[{"level": 1, "until_step": 5}, {"level": 2, "until_step": 3}])
    s = LDMSettings(curriculum=[{"level": 2, "until_step": 5}, {"level": 1, "until_step": 9}])
    assert [s.level_at(i) for i in (0, 4, 5, 8, 9, 100)] == [2, 2, 1, 1, 0, 0]


def test_slots_are_sparse_canvases_of_the_image():
    images, _, boxes, labels, valid = _batch()
    slots = slots_from_image(images, boxes, labels, valid, max_crops=4)
    assert slots.canvases.shape == (2, 4, 3, 16, 16)
    assert slots.valid.tolist() == [[True, True, False, False]] * 2
    inside = box_masks(slots.boxes, slots.valid, 16, 16)[:, :, None].expand_as(slots.canvases)
    full = images[:, None].expand_as(slots.canvases)
    assert torch.equal(slots.canvases[inside], full[inside])
    assert (slots.canvases[~inside] == 0).all()
    assert torch.equal(slots.crop(0, 1), images[0, :, 8:13, 6:11])
    # More crops than slots: a random subset of the valid ones, all slots filled.
    shuffled = slots_from_image(images, boxes, labels, valid, max_crops=1, gen=torch.Generator().manual_seed(3))
    assert shuffled.valid.all() and set(shuffled.labels.flatten().tolist()) <= {1, 2}


def test_condition_tensor_layout_and_dropping():
    images, maps, boxes, labels, valid = _batch()
    enc = ConditionEncoder(level_num_labels=(4, 2), embed_dim=3, with_crops=True, style_dim=5, crop_size=8)
    slots = slots_from_image(images, boxes, labels, valid, max_crops=3)
    cond = enc.image_condition(maps, slots)
    assert cond.shape == (2, enc.image_channels, 16, 16) == (2, 3 + 4 + 5 + 6, 16, 16)
    assert torch.allclose(cond[:, :3], enc.embedding(maps).permute(0, 3, 1, 2))
    canvas, mask, style = cond[:, 3:6], cond[:, 6], cond[:, 7:]
    in_box = box_masks(slots.boxes, slots.valid, 16, 16).any(1)  # (B, H, W)
    assert torch.equal(canvas[0, :, 8:13, 6:11], images[0, :, 8:13, 6:11])  # the crop's own pixels
    assert (canvas.permute(1, 0, 2, 3)[:, ~in_box] == 0).all() and torch.equal(mask, in_box.float())
    # Each crop's style covers the whole region of its type, and nothing else.
    for b in range(2):
        for k, label in ((0, 1), (1, 2)):
            region = maps[b] == label
            values = style[b][:, region]
            assert torch.allclose(values, values[:, :1].expand_as(values))
            crop = slots.crop(b, k)
            assert torch.allclose(values[5:8, 0], crop.mean((1, 2)), atol=1e-5)  # colour mean
            assert torch.allclose(values[8:, 0], crop.std((1, 2), unbiased=False), atol=1e-3)  # and spread
        assert (style[b][:, (maps[b] != 1) & (maps[b] != 2)] == 0).all()  # types without a crop
    dropped = enc.image_condition(maps, slots, drop_map=torch.tensor([True, False]), drop_crops=torch.tensor([False, True]))
    assert torch.allclose(dropped[0, :3], enc.embedding.weight[enc.null_index][:, None, None].expand(3, 16, 16))
    assert torch.equal(dropped[1, :3], cond[1, :3]) and (dropped[1, 3:] == 0).all()
    assert torch.allclose(dropped[0, 3:], cond[0, 3:], atol=1e-6)  # the CNN sees another batch: rounding only
    # Coarser levels have their own rows; ids beyond a level's range are refused.
    assert not torch.equal(enc.map_channels(maps.clamp(max=1), level=1), enc.map_channels(maps.clamp(max=1), level=0))
    with pytest.raises(HistopipeError, match="out of range"):
        enc.map_channels(maps, level=1)
    # The map-only encoder reads the map alone.
    assert ConditionEncoder(level_num_labels=(4,), embed_dim=3).image_condition(maps).shape == (2, 3, 16, 16)


def test_placed_crops_and_tokens():
    crop = np.full((5, 5, 3), 255, np.uint8)
    slots = slots_from_placed([[PlacedCrop(crop, 2, 3, 4)], []], size=16, max_crops=2)
    assert slots.valid.tolist() == [[True, False], [False, False]]
    assert (slots.crop(0, 0) == 1).all() and slots.canvases[0, 0].sum() == 75
    with pytest.raises(HistopipeError, match="does not fit"):
        slots_from_placed([[PlacedCrop(crop, 2, 14, 0)]], size=16, max_crops=1)
    feats = CropFeaturizer("thumbnail")(slots)
    assert feats.shape == (2, 2, 48) and torch.allclose(feats[0, 0], torch.ones(48)) and (feats[1] == 0).all()
    tok = CropTokenEncoder(feature_dim=48, cross_attention_dim=8, level_num_labels=(4,))
    tokens = tok(feats, slots.labels, slots.valid)
    assert tokens.shape == (2, 3, 8)
    null = tok.null_token[0, 0]
    assert torch.allclose(tokens[1], null.expand(3, 8)) and not torch.allclose(tokens[0, 1], null)


def test_box_transforms_follow_rot90_and_flip():
    boxes = torch.tensor([[2, 5, 4], [0, 0, 3], [9, 1, 7]])
    valid = torch.ones(3, dtype=torch.bool)
    masks = box_masks(boxes, valid, 16, 16)
    for k in range(4):
        for flip in (False, True):
            expected = torch.rot90(masks, k, (-2, -1))
            if flip:
                expected = expected.flip(-1)
            assert torch.equal(box_masks(transform_boxes(boxes, k, flip, 16), valid, 16, 16), expected), (k, flip)


def test_augmentation_keeps_image_map_and_crops_consistent():
    images, maps, boxes, labels, valid = _batch(b=6)
    gen = torch.Generator().manual_seed(1)
    ai, am, ab = flip_rotate(images, maps, boxes, gen)
    for b in range(6):
        for k in range(2):
            y0, x0, s = boxes[b, k].tolist()
            y1, x1, _ = ab[b, k].tolist()
            crop, mcrop = images[b, :, y0 : y0 + s, x0 : x0 + s], maps[b, y0 : y0 + s, x0 : x0 + s]
            got, mgot = ai[b, :, y1 : y1 + s, x1 : x1 + s], am[b, y1 : y1 + s, x1 : x1 + s]
            syms = [(torch.rot90(crop, r, (-2, -1)), torch.rot90(mcrop, r, (-2, -1))) for r in range(4)]
            syms += [(c.flip(-1), m.flip(-1)) for c, m in syms]
            assert any(torch.equal(got, c) and torch.equal(mgot, m) for c, m in syms)
    # Stain: identity at alpha=1, beta=0; more haematoxylin darkens.
    ident = hed_jitter(images, torch.ones(6, 3), torch.zeros(6, 3))
    assert torch.allclose(ident, images, atol=1e-4)
    darker = hed_jitter(images, torch.tensor([[1.5, 1.0, 1.0]] * 6), torch.zeros(6, 3))
    assert darker.mean() < images.mean()
    out, _, _ = augment_batch(images, maps, boxes, torch.Generator().manual_seed(2), flip=False, stain=0.1, brightness=0.1)
    assert out.shape == images.shape and not torch.equal(out, images) and out.abs().max() <= 1


@pytest.mark.parametrize("vae_levels", [2, 4])
@pytest.mark.parametrize("injection", ["input", "controlnet", "both"])
def test_condition_reaches_latent_resolution(vae_levels, injection):
    torch.manual_seed(0)
    vae = build_vae(tiny_vae(block_out_channels=(32,) * vae_levels), 32)
    factor = 2 ** (vae_levels - 1)
    den: Denoiser = build_denoiser(tiny_ldm(injection=injection, condition_channels=6), vae, 32, [4])
    images, maps, boxes, labels, valid = _batch(size=32)
    slots = slots_from_image(images, boxes, labels, valid, 3)
    enc = den.condition_encoder
    cond = enc.image_condition(maps, slots)
    assert (den.controlnet is not None) == (injection != "input")
    assert (enc.to_latent is not None) == (injection != "controlnet")
    if enc.to_latent is not None:
        assert enc(cond).shape == (2, 6, 32 // factor, 32 // factor)
        assert den.unet.config.in_channels == 4 + 6
    if den.controlnet is not None:
        assert cond.shape[1] == den.controlnet.config.conditioning_channels
        assert den.controlnet.controlnet_cond_embedding(cond).shape[-2:] == (32 // factor, 32 // factor)
    latents = torch.randn(2, 4, 32 // factor, 32 // factor)
    out = den(latents, torch.tensor([10, 500]), maps, slots)
    assert out.shape == latents.shape
    # The output depends on the map and on the crops through every injection.
    other = den(latents, torch.tensor([10, 500]), maps.flip(0), slots)
    no_crops = den(latents, torch.tensor([10, 500]), maps, slots, drop_crops=torch.tensor([True, True]))
    if injection == "controlnet":  # zero-initialised outputs: no effect until trained
        assert torch.equal(other, out) and torch.equal(no_crops, out)
    else:
        assert not torch.allclose(other, out) and not torch.allclose(no_crops, out)


def test_pretrained_unet_needs_a_controlnet_branch():
    with pytest.raises(ConfigError, match="injection: controlnet"):
        tiny_ldm(pretrained_unet="/some/unet", injection="input")
    assert tiny_ldm(pretrained_unet="/some/unet", injection="controlnet").injection == "controlnet"
    with pytest.raises(ConfigError, match="injection"):
        tiny_ldm(injection="cross-attention")


def test_crop_features_are_computed_at_the_configured_side():
    """A convolutional encoder sees the crops at crop_feature_size, not resized again to its
    224 px input: the features equal the encoder's output on the crops resized to that side."""
    from histopipe.encoders import get_encoder

    gen = torch.Generator().manual_seed(0)
    crops = [PlacedCrop(torch.randint(0, 256, (12, 12, 3), generator=gen, dtype=torch.uint8).numpy(), 1, 2, 3)]
    slots = slots_from_placed([crops], size=32, max_crops=2)
    small = CropFeaturizer("efficientnet_lite0", size=40)(slots)
    enc = get_encoder("efficientnet_lite0").eval()
    x = torch.nn.functional.interpolate(slots.crop(0, 0)[None].float(), size=(40, 40), mode="bilinear",
                                        antialias=True, align_corners=False)
    uint8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    with torch.inference_mode():
        expected = enc(enc.normalize(uint8)).float()[0]
    assert torch.allclose(small[0, 0], expected, atol=1e-4) and (small[0, 1] == 0).all()
    full = CropFeaturizer("efficientnet_lite0")(slots)  # the encoder's own input size
    assert not torch.allclose(full[0, 0], small[0, 0], atol=1e-2)
