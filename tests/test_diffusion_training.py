"""Training the tiny diffusion model: overfitting, conditioning, guidance, round trips, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from torch.utils.data import Subset

from histopipe.cli import main
from histopipe.diffusion.conditioning import slots_from_image
from histopipe.diffusion.data import open_training_set, store_info
from histopipe.diffusion.models import build_unet, build_vae, load_vae
from histopipe.diffusion.pipeline import HistoSynthesisPipeline
from histopipe.diffusion.settings import VARIANTS
from histopipe.diffusion.tasks import LDMTask, VAETask, reference_batch
from histopipe.diffusion.training import complete_checkpoints, train
from histopipe.errors import HistopipeError
from tests.diffusion_helpers import LABEL_NAMES, one_thread, tiny_ldm, tiny_vae, write_patch_store  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = write_patch_store(tmp_path_factory.mktemp("patches") / "patches.zarr")
    return open_training_set(path, "train")


def _vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return build_vae(tiny_vae(), 32)  # frozen and untrained: a fixed map from images to latents


def _task(store, s, vae=None):
    return LDMTask(s, vae or _vae(), 32, store_info(store.path)["level_luts"], reference_batch(store, 2), LABEL_NAMES, 0.5)


@pytest.fixture(scope="module")
def overfit(store, tmp_path_factory):
    """The map + raw crops model trained on one fixed batch of 4 patches."""
    s = tiny_ldm(max_steps=120, p_drop_crops=0.2, p_drop_map=0.0)
    task = _task(store, s)
    out = tmp_path_factory.mktemp("overfit")
    result = train(task, Subset(store, [0, 1, 2, 3]), s, out)
    return task, result, out


def _conditions(store, idx):
    ref = reference_batch(Subset(store, idx), len(idx))
    slots = slots_from_image(ref["image"], ref["crop_boxes"], ref["crop_labels"], ref["crop_valid"], 3)
    return ref, slots


def _sample(pipe, maps, slots, seed=0, guidance=1.0, sampler="ddim", steps=4):
    pipe.use_sampler(sampler)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(maps))]
    return pipe(maps, slots, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt")


@pytest.mark.slow
def test_tiny_model_overfits_a_fixed_batch(overfit):
    _, result, out = overfit
    losses = np.array(result.losses)
    assert len(losses) == 120 and np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.5 * losses[:10].mean()
    assert (out / "model" / "model_index.json").is_file()
    assert [step for step, _ in complete_checkpoints(out / "checkpoints")] == [120]
    assert any((out / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_conditioning_changes_the_output(overfit, store):
    task, _, _ = overfit
    pipe = task.pipeline(task.model.eval())
    ref, slots = _conditions(store, [0, 1])
    maps = ref["map"]
    base = _sample(pipe, maps, slots).images
    again = _sample(pipe, maps, slots).images
    assert torch.equal(base, again)  # same seed, same conditions: same images
    swapped_maps = _sample(pipe, maps.flip(0), slots).images
    swapped_crops = _sample(pipe, maps, slots.select(torch.tensor([1, 0]))).images
    assert (swapped_maps - base).abs().mean() > 1e-3
    assert (swapped_crops - base).abs().mean() > 1e-3
    out = pipe(maps.numpy(), slots, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3) and out.images.dtype == np.uint8
    assert np.array_equal(out.labels, maps.numpy())  # the label of each image is its map


@pytest.mark.slow
def test_guidance_scale_one_is_the_conditional_prediction(overfit, store):
    task, _, _ = overfit
    pipe = task.pipeline(task.model.eval())
    ref, slots = _conditions(store, [0, 1])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        cond = pipe.noise_prediction(latents, t, ref["map"], slots, None, with_uncond=False)
        at_one = pipe.noise_prediction(latents, t, ref["map"], slots, None, guidance_scale=1.0, with_uncond=True)
        at_three = pipe.noise_prediction(latents, t, ref["map"], slots, None, guidance_scale=3.0)
        uncond = pipe.noise_prediction(latents, t, ref["map"], slots.dropped(torch.tensor([True, True])), None, with_uncond=False)
    assert torch.allclose(at_one, cond, atol=1e-5)
    assert torch.allclose(at_three, uncond + 3 * (cond - uncond), atol=1e-4)
    assert not torch.allclose(at_three, cond, atol=1e-4)


@pytest.mark.slow
def test_save_and_reload_give_the_same_images(overfit, store, tmp_path):
    task, _, out = overfit
    pipe = task.pipeline(task.model.eval())
    ref, slots = _conditions(store, [2, 3])
    before = _sample(pipe, ref["map"], slots, seed=7, guidance=2.0, sampler="dpmpp").images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = HistoSynthesisPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "condition_encoder", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.variant == "map_crops" and loaded.config.max_crops == 3 and loaded.config.label_names == LABEL_NAMES
    after = _sample(loaded, ref["map"], slots, seed=7, guidance=2.0, sampler="dpmpp").images
    # CPU kernels may round differently for tensors at other addresses: ~1e-6.
    assert torch.allclose(before, after, atol=1e-5)
    exported = HistoSynthesisPipeline.from_pretrained(out / "model")  # the training export
    assert exported.variant == "map_crops"


@pytest.mark.slow
def test_resume_continues_like_an_uninterrupted_run(store, tmp_path):
    s = tiny_ldm(max_steps=4, checkpoint_every=2, ema_decay=0.9, augment_flip=True, augment_stain=0.05, augment_brightness=0.05)
    full = train(_task(store, s), store, s, tmp_path / "full")

    class Preempted(Exception):
        pass

    def kill_at_3(step, loss):
        if step == 3:
            raise Preempted

    with pytest.raises(Preempted):
        train(_task(store, s), store, s, tmp_path / "cut", callback=kill_at_3)
    assert [st for st, _ in complete_checkpoints(tmp_path / "cut" / "checkpoints")] == [2]
    resumed = train(_task(store, s), store, s, tmp_path / "cut")
    assert resumed.resumed_from == 2 and resumed.step == 4 == full.step
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-5, atol=1e-7)
    for run in ("full", "cut"):
        state = json.loads((tmp_path / run / "checkpoints" / "checkpoint-4" / "training_state.json").read_text())
        assert state["step"] == 4
    opt_a = torch.load(tmp_path / "full" / "checkpoints" / "checkpoint-4" / "optimizer.bin", weights_only=False)
    opt_b = torch.load(tmp_path / "cut" / "checkpoints" / "checkpoint-4" / "optimizer.bin", weights_only=False)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for k in opt_a["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_a["state"][k][name], opt_b["state"][k][name], rtol=1e-5, atol=1e-7)
    a = HistoSynthesisPipeline.from_pretrained(tmp_path / "full" / "model").unet.state_dict()
    b = HistoSynthesisPipeline.from_pretrained(tmp_path / "cut" / "model").unet.state_dict()
    for k in a:  # EMA weights of the export
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_and_samples(variant, store, tmp_path):
    curriculum = [{"level": 1, "until_step": 2}] if variant == "map_crops" else []
    s = tiny_ldm(variant=variant, max_steps=3, sample_every=3, curriculum=curriculum, grad_accum=2 if variant == "map" else 1)
    result = train(_task(store, s), store, s, tmp_path)
    assert result.step == 3 and np.isfinite(result.losses).all()
    assert (tmp_path / "samples" / "step-0000003.png").is_file()
    pipe = HistoSynthesisPipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.variant == variant
    assert (pipe.crop_encoder is not None) == (variant == "map_crop_embeddings")
    ref, slots = _conditions(store, [0, 1])
    for sampler in ("ddim", "dpmpp", "dpmpp_sde"):
        pipe.use_sampler(sampler)
        out = pipe(ref["map"], slots, num_images=2, num_inference_steps=2, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (2, 32, 32, 3) and out.images.dtype == np.uint8


@pytest.mark.parametrize("variant", ["map_crops", "map_crop_embeddings"])
def test_training_under_bf16_autocast(store, tmp_path, variant):
    """mixed_precision bf16 (what `auto` gives on a GPU) trains every crop branch; CPU autocast
    answers some layers in bf16 that CUDA autocast keeps in float32, so this runs here."""
    s = tiny_ldm(variant=variant, max_steps=2, mixed_precision="bf16")
    result = train(_task(store, s), store, s, tmp_path)
    assert result.step == 2 and np.isfinite(result.losses).all()


def test_stochastic_sampler_is_reproducible_per_seed_and_differs_from_the_ode(store, tmp_path):
    s = tiny_ldm(variant="map", max_steps=2)
    train(_task(store, s), store, s, tmp_path)
    pipe = HistoSynthesisPipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    ref, slots = _conditions(store, [0, 1])

    def sample(sampler: str, seed: int) -> np.ndarray:
        pipe.use_sampler(sampler)
        return pipe(ref["map"], slots, num_inference_steps=4, generator=torch.Generator().manual_seed(seed)).images

    sde = sample("dpmpp_sde", 3)
    assert np.array_equal(sde, sample("dpmpp_sde", 3))  # the step noise comes from the seed's generator
    assert not np.array_equal(sde, sample("dpmpp_sde", 4))
    assert not np.array_equal(sde, sample("dpmpp", 3))  # same start noise, fresh noise on the way
    with pytest.raises(HistopipeError, match="unknown sampler"):
        pipe.use_sampler("euler")


def test_vae_training_lowers_reconstruction_loss(store, tmp_path):
    s = tiny_vae(max_steps=30, sample_every=30)
    task = VAETask(s, 32, reference_batch(store, 2), reference_batch(store, 8)["image"])
    result = train(task, store, s, tmp_path)
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5])
    vae = load_vae(tmp_path / "model")
    assert vae.config.scaling_factor != 1.0 and vae.config.latent_channels == 4
    assert (tmp_path / "samples" / "step-0000030.png").is_file()


def test_frozen_pretrained_unet_trains_only_the_condition_branch(store, tmp_path):
    torch.manual_seed(1)
    build_unet(tiny_ldm(), 4, 8).save_pretrained(tmp_path / "sd" / "unet")  # sample_size differs on purpose
    s = tiny_ldm(pretrained_unet=str(tmp_path / "sd"), injection="controlnet", max_steps=2)
    task = _task(store, s)
    unet_before = {k: v.clone() for k, v in task.model.unet.state_dict().items()}
    branch_before = {k: v.clone() for k, v in task.model.controlnet.state_dict().items()}
    train(task, store, s, tmp_path / "run")
    assert all(torch.equal(unet_before[k], v) for k, v in task.model.unet.state_dict().items())
    assert any(not torch.equal(branch_before[k], v) for k, v in task.model.controlnet.state_dict().items())
    assert HistoSynthesisPipeline.from_pretrained(tmp_path / "run" / "model").image_size == 32


def test_train_vae_copies_a_pretrained_vae(store, tmp_path):
    _vae(3).save_pretrained(tmp_path / "sd" / "vae")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"vae": {"pretrained": str(tmp_path / "sd")}}))
    assert main(["train-vae", "--dataset", str(store.path), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "cfg.yaml")]) == 0
    a, b = _vae(3).state_dict(), load_vae(tmp_path / "out" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_perceptual_loss_sees_blur_that_l1_barely_sees():
    from histopipe.diffusion.autoencoder import PerceptualLoss

    torch.manual_seed(0)
    loss = PerceptualLoss("efficientnet_lite0")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    shifted = (x + 0.1).clamp(-1, 1)  # a brightness change of similar L1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(blurred, x) > 2 * loss(shifted, x)
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.model.training  # frozen statistics


def test_vae_discriminator_enters_after_its_warm_up(store, tmp_path):
    s = tiny_vae(max_steps=4, disc_start=2, disc_weight=0.5, disc_layers=2, disc_channels=16, perceptual_weight=0.5)
    task = VAETask(s, 32, reference_batch(store, 2), reference_batch(store, 8)["image"])
    task.to(torch.device("cpu"), torch.float32)
    batch = reference_batch(store, 4)
    gen = torch.Generator().manual_seed(0)
    before = task.model(batch["image"], gen, step=1)
    after = task.model(batch["image"], gen, step=2)
    assert "g" not in before and {"g", "d", "g_weight", "perceptual"} <= after.keys()
    assert float(after["g_weight"]) > 0
    disc_before = {k: v.clone() for k, v in task.model.disc.state_dict().items()}
    train(task, store, s, tmp_path)
    assert any(not torch.equal(disc_before[k], v) for k, v in task.model.disc.state_dict().items())
    vae = load_vae(tmp_path / "model")  # the export holds the VAE alone
    assert sum(p.numel() for p in vae.parameters()) == sum(p.numel() for p in task.model.vae.parameters())


class _PoisonedLoss:
    """Fault injection around a real LDM task: its loss times NaN at the given steps (what an
    overflow in bf16 or a corrupt batch does to a real run)."""

    def __init__(self, task, bad_steps):
        self.task, self.bad_steps = task, set(bad_steps)

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch, gen, step):
        loss = self.task.loss(model, batch, gen, step)
        return loss * float("nan") if step in self.bad_steps or "all" in self.bad_steps else loss


def _unet_weights(folder):
    return HistoSynthesisPipeline.from_pretrained(folder).unet.state_dict()


def test_updates_with_non_finite_gradients_are_skipped(store, tmp_path):
    s = tiny_ldm(max_steps=5, checkpoint_every=1, checkpoints_keep=10, ema_decay=0.0, eval_every=0, sample_every=0)
    result = train(_PoisonedLoss(_task(store, s), bad_steps={2, 3}), store, s, tmp_path)
    # The loop's step counter is 0-based when the loss is computed and 1-based after it.
    assert result.skipped_steps == [3, 4] and result.step == 5
    assert np.isnan(result.losses[2]) and np.isnan(result.losses[3]) and np.isfinite(result.losses[4])
    ckpt = tmp_path / "checkpoints"
    w2, w3, w4, w5 = (_unet_weights(ckpt / f"checkpoint-{i}" / "model") for i in (2, 3, 4, 5))
    for k in w2:
        assert torch.isfinite(w5[k]).all(), k
        assert torch.equal(w2[k], w3[k]) and torch.equal(w3[k], w4[k]), k  # the poisoned steps changed nothing
    assert any(not torch.equal(w4[k], w5[k]) for k in w4)  # the next good step trains again


def test_a_run_of_non_finite_steps_stops_training_with_a_clear_error(store, tmp_path):
    s = tiny_ldm(max_steps=20, checkpoint_every=2, max_nonfinite_steps=3, eval_every=0, sample_every=0)
    task = _PoisonedLoss(_task(store, s), bad_steps={2, 3, 4, 5, 6, 7})
    with pytest.raises(HistopipeError, match=r"3 optimizer steps in a row \(steps 3-5\).*checkpoint-4.*Lower the learning rate"):
        train(task, store, s, tmp_path)
    assert not (tmp_path / "model").exists()


def test_checkpoints_of_other_settings_are_set_aside_not_resumed(store, tmp_path, caplog):
    """A config edit reruns the job: it resumes only from checkpoints of the same settings
    (a longer max_steps is the same run extended); others are kept aside, not lost."""
    s = tiny_ldm(max_steps=2, checkpoint_every=1, eval_every=0, sample_every=0)
    train(_task(store, s), store, s, tmp_path)
    longer = tiny_ldm(max_steps=3, checkpoint_every=1, eval_every=0, sample_every=0)
    assert train(_task(store, longer), store, longer, tmp_path).resumed_from == 2
    other = tiny_ldm(max_steps=3, checkpoint_every=1, eval_every=0, sample_every=0, lr=5e-4, batch_size=3)
    with caplog.at_level("WARNING", logger="histopipe.diffusion.training"):
        result = train(_task(store, other), store, other, tmp_path)
    assert result.resumed_from == 0 and result.step == 3
    (aside,) = tmp_path.glob("checkpoints.superseded-*")
    assert [p.name for p in sorted(aside.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-3"]
    assert "batch_size: 4 -> 3" in caplog.text and "lr: 0.001 -> 0.0005" in caplog.text
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-3" / "training_state.json").read_text())
    assert state["settings"]["lr"] == 5e-4


def test_settings_unknown_to_a_checkpoint_do_not_count_as_changes():
    """A checkpoint of an older histopipe lacks settings added since (at their defaults)."""
    from histopipe.diffusion.training import changed_settings, resume_settings

    s = tiny_ldm()
    saved = resume_settings(s)
    del saved["max_grad_norm"]
    saved["a_removed_setting"] = 1
    assert changed_settings(saved, s) == {}
    saved["lr"] = 0.5
    assert changed_settings(saved, s) == {"lr": (0.5, s.lr)}


def test_progress_fd_comes_with_the_fd_of_other_real_patches():
    from histopipe.diffusion.monitor import SampleMonitor
    from histopipe.diffusion.tasks import other_batch

    # The other patches are the ones the reference left out, evenly spaced.
    items = [{"image": torch.full((3, 4, 4), float(i))} for i in range(10)]
    ref = set(reference_batch(items, 4, spread=True)["image"][:, 0, 0, 0].tolist())
    other = set(other_batch(items, 4, 4)["image"][:, 0, 0, 0].tolist())
    assert len(ref) == len(other) == 4 and not ref & other
    assert other_batch(items[:5], 4, 4) is None  # one patch left: no covariance

    # Real patches: smooth pink-purple fields; the samples: noise. Real against other real
    # patches is the floor, constant over evaluations and far below the noise's FD.
    rng = np.random.default_rng(0)

    def tissue(n):
        base = np.array([200, 120, 180]) + rng.normal(0, 12, (n, 1, 1, 3))
        return np.clip(base + rng.normal(0, 6, (n, 16, 16, 3)), 0, 255).astype(np.uint8)

    monitor = SampleMonitor(tissue(12), "efficientnet_lite0", other_real=tissue(12))
    noise = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    first, second = monitor(noise, None, torch.device("cpu")), monitor(tissue(12), None, torch.device("cpu"))
    assert first["fd_real"] == second["fd_real"] < second["fd"] < first["fd"]
    assert "fd_real" not in SampleMonitor(tissue(4), "efficientnet_lite0")(noise, None, torch.device("cpu"))
