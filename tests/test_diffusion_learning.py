"""The generative core learns what it is for: on a constructed cohort whose tissue types have
their own colour and texture, small models trained for a minute or two draw images whose
regions follow the map (label fidelity with a colour classifier), unlike the unconditional
model, and the map + raw crops model carries a crop of an unusual colour into its region and
nowhere else. These tests fail for a model that ignores its map or its crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histopipe.diffusion.conditioning import PlacedCrop, slots_from_placed
from histopipe.diffusion.data import open_training_set, store_info
from histopipe.diffusion.settings import LDMSettings, VAESettings
from histopipe.diffusion.tasks import LDMTask, VAETask, reference_batch
from histopipe.diffusion.training import train
from tests.quality_helpers import NAMES, TYPE_COLOURS, map_agreement, threads, write_cohort

SIZE = 32
TRAIN = dict(num_workers=0, checkpoint_every=10_000, sample_every=0, eval_every=0, log_every=50,
             mixed_precision="fp32", seed=0, lr_schedule="cosine", augment_flip=True)
CYAN = np.array([60.0, 190.0, 200.0])  # no tissue type of the cohort has this colour


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    path = write_cohort(tmp_path_factory.mktemp("cohort") / "patches.zarr", n=384, size=SIZE)
    return path, open_training_set(path, "train"), open_training_set(path, "test")


@pytest.fixture(scope="module")
def vae(cohort, tmp_path_factory):
    """A 2× autoencoder trained for ~45 s (colour channels permuted per patch, so that it can
    draw colours the tissue types never have)."""
    _, train_set, _ = cohort

    class Permuted(torch.utils.data.Dataset):
        def __len__(self):
            return len(train_set)

        def __getitem__(self, i):
            item = dict(train_set[i])
            perm = torch.randperm(3, generator=torch.Generator().manual_seed(i))
            item["image"] = item["image"][perm]
            return item

    s = VAESettings(**TRAIN, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, mid_attention=False,
                    latent_channels=4, batch_size=16, max_steps=150, lr=2e-3, warmup_steps=10,
                    perceptual_weight=0.0, disc_weight=0.0)
    task = VAETask(s, SIZE, reference_batch(train_set, 8), reference_batch(Permuted(), 64)["image"])
    with threads(2):
        result = train(task, Permuted(), s, tmp_path_factory.mktemp("vae"))
    return result.model_dir


def _ldm(variant: str, **kw) -> LDMSettings:
    base = dict(variant=variant, block_out_channels=(32, 64), layers_per_block=1, attention_heads=2,
                cross_attention_dim=32, norm_num_groups=16, map_embed_dim=4, max_crops=3, condition_channels=16,
                crop_style_dim=8, crop_style_size=8, cond_embedding_base_channels=16, crop_feature_encoder="thumbnail",
                batch_size=16, max_steps=300, lr=2e-3, warmup_steps=20, weight_decay=0.0, ema_decay=0.99,
                prediction_type="v_prediction", snr_gamma=5.0, augment_stain=0.0, augment_brightness=0.0,
                p_drop_map=0.1, p_drop_crops=0.1, sample_steps=10)
    return LDMSettings(**{**TRAIN, **base, **kw})


def _trained(variant: str, cohort, vae_dir, out, **kw):
    from histopipe.diffusion.models import load_vae

    path, train_set, test_set = cohort
    s = _ldm(variant, **kw)
    info = store_info(path)
    task = LDMTask(s, load_vae(vae_dir), SIZE, info["level_luts"], reference_batch(test_set, 8), NAMES, 2.0)
    with threads(2):
        train(task, train_set, s, out)
    return task, test_set


def _samples(task, ref, crops=None, steps=10, guidance=1.0):
    """Images uint8 (N, S, S, 3) for the reference maps (and their own or the given crops)."""
    pipe = task.pipeline(task.model.eval())
    pipe.use_sampler("ddim")
    maps, slots, feats = task._condition_inputs(ref["image"], ref["map"], ref["crop_boxes"], ref["crop_labels"], ref["crop_valid"], 0, None)
    if crops is not None:
        slots = crops
    gens = [torch.Generator().manual_seed(i) for i in range(len(maps))]
    with torch.no_grad(), threads(2):
        return pipe(maps, slots, feats, num_images=len(maps), num_inference_steps=steps, guidance_scale=guidance, generator=gens).images


@pytest.fixture(scope="module")
def map_model(cohort, vae, tmp_path_factory):
    return _trained("map", cohort, vae, tmp_path_factory.mktemp("map"))


@pytest.fixture(scope="module")
def crops_model(cohort, vae, tmp_path_factory):
    return _trained("map_crops", cohort, vae, tmp_path_factory.mktemp("map_crops"))


@pytest.mark.slow
def test_samples_follow_their_map_and_unconditional_ones_do_not(cohort, vae, map_model, crops_model, tmp_path):
    path, _, test_set = cohort
    ref = reference_batch(test_set, 32, spread=True)
    maps = ref["map"].numpy()
    real = ((ref["image"].permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    assert map_agreement(real, maps) > 0.95  # the classifier reads the real patches right
    for task, _ in (map_model, crops_model):
        assert map_agreement(_samples(task, ref), maps) >= 0.8, task.s.variant
    uncond, _ = _trained("unconditional", cohort, vae, tmp_path / "uncond", max_steps=150)
    assert map_agreement(_samples(uncond, ref), maps) < 0.5


@pytest.mark.slow
def test_a_crop_of_an_unusual_colour_shows_up_in_its_region_only(crops_model):
    task, test_set = crops_model
    ref = reference_batch(test_set, len(test_set))
    maps = ref["map"].numpy()
    # Patches with a red region large enough for a 10-px crop, and some other region.
    picks = [i for i in range(len(maps)) if (maps[i] == 1).mean() > 0.3 and (maps[i] != 1).mean() > 0.3][:12]
    assert len(picks) >= 6
    ref = {k: v[picks] for k, v in ref.items()}
    maps = maps[picks]
    placed_normal, placed_cyan = [], []
    rng = np.random.default_rng(0)
    from histopipe.regions import sample_square

    for m in maps:
        y0, x0 = sample_square(m == 1, 10, rng)
        stripes = 1.0 - 0.2 * ((np.arange(10)[:, None] // 2) % 2) * np.ones((1, 10))
        red = (TYPE_COLOURS[1][None, None] * stripes[..., None]).astype(np.uint8)
        cyan = (CYAN[None, None] * stripes[..., None]).astype(np.uint8)
        placed_normal.append([PlacedCrop(red, 1, y0, x0)])
        placed_cyan.append([PlacedCrop(cyan, 1, y0, x0)])
    normal = _samples(task, ref, slots_from_placed(placed_normal, SIZE, 3)).astype(float)
    tinted = _samples(task, ref, slots_from_placed(placed_cyan, SIZE, 3)).astype(float)
    region = maps == 1
    boxes = np.zeros_like(region)
    for i, crops in enumerate(placed_cyan):
        y0, x0, s = crops[0].box
        boxes[i, y0 : y0 + s, x0 : x0 + s] = True
    red, cyan = TYPE_COLOURS[1] * 0.9, CYAN * 0.9
    # In its box the crop is drawn: the colour there is the crop's, not red's.
    in_box = tinted[boxes].mean(0)
    assert np.linalg.norm(in_box - cyan) < np.linalg.norm(in_box - red)
    # Across its region the colour moves towards the crop's, by at least a third of the way.
    shift = (tinted[region & ~boxes].mean(0) - normal[region & ~boxes].mean(0)) @ (cyan - red) / np.linalg.norm(cyan - red) ** 2
    assert shift > 1 / 3
    # Outside the region the image hardly changes (same seeds, only the crop differs).
    inside_change = np.abs(tinted - normal)[region].mean()
    outside_change = np.abs(tinted - normal)[~region].mean()
    assert outside_change < 0.25 * inside_change
