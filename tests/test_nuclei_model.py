"""Nuclei model (Part B): multinomial diffusion, the joint denoiser and its pipeline, NuDiff,
the latent and text variants, resumption, the layout model and synthesis. Tiny models on CPU."""

from __future__ import annotations

import dataclasses
import json
import string

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from scipy import ndimage
from torch.utils.data import Subset

from histopipe.config import load_config
from histopipe.diffusion.tasks import reference_batch
from histopipe.diffusion.training import complete_checkpoints, train
from histopipe.errors import HistopipeError
from histopipe.nuclei import settings as S
from histopipe.nuclei import synthesis
from histopipe.nuclei.dataset import NucleiDataset
from histopipe.nuclei.labels import points_from_raster
from histopipe.nuclei.layout import LayoutModel, fit_layout, parse_counts
from histopipe.nuclei.model import JointDenoiser, PointMapEncoder
from histopipe.nuclei.multinomial import MultinomialDiffusion
from histopipe.nuclei.pipeline import NucleiPipeline, tissue_prompts
from histopipe.nuclei.readers import NucleiSample
from histopipe.nuclei.store import NucleiStoreWriter, store_info
from histopipe.nuclei.synthesis import synthesize_nuclei
from histopipe.nuclei.tasks import JointTask, flip_rotate
from histopipe.nuclei.training import (
    load_nuclei_pipeline,
    load_text_encoder,
    train_nuclei,
    train_nuclei_dataset,
)
from tests.diffusion_helpers import one_thread  # noqa: F401 (autouse fixture)
from tests.nuclei_model_helpers import (
    CLASS_NAMES,
    SIZE,
    TISSUE_NAMES,
    DiscDataset,
    disc_item,
    tiny_model,
    tiny_train,
)

K = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def data():
    return DiscDataset(8)


@pytest.fixture(scope="module")
def overfit(data, tmp_path_factory):
    """The joint pixel-space model trained on one fixed batch of 4 items."""
    m, s = tiny_model(), tiny_train(max_steps=80, checkpoint_every=40, sample_every=80)
    task = JointTask(m, s, CLASS_NAMES, TISSUE_NAMES, reference_batch(data, 2))
    out = tmp_path_factory.mktemp("joint")
    result = train(task, Subset(data, [0, 1, 2, 3]), s, out)
    return task, result, out


def _points(data, idx=(0, 1)):
    return torch.stack([data[i]["points"] for i in idx])


# ---------------------------------------------------------------- settings


def test_settings_defaults_agree_with_the_schema():
    cfg = load_config(None)
    for build, cls in [
        (S.model_settings, S.NucleiModelSettings), (S.train_settings, S.NucleiTrainSettings),
        (S.synthesis_settings, S.NucleiSynthesisSettings), (S.layout_settings, S.NucleiLayoutSettings),
    ]:
        assert build(cfg) == cls()
    assert S.NucleiModelSettings().loss_weights == (9.0, 1.0, 3.0)
    assert issubclass(S.NucleiTrainSettings, S.TrainLoopSettings)
    with pytest.raises(HistopipeError, match="nuclei.model.mode"):
        S.NucleiModelSettings(mode="gan")
    with pytest.raises(HistopipeError, match="text_encoder"):
        S.NucleiModelSettings(tissue_condition="text")


# ---------------------------------------------------------------- multinomial diffusion


def test_multinomial_marginals_and_limits():
    md = MultinomialDiffusion(4, timesteps=100)
    x0 = torch.nn.functional.one_hot(torch.tensor([[2, 0], [1, 3]]), 4).movedim(-1, 0)[None].float()
    for t in (0, 10, 50, 99):
        q = md.q_probs(x0, torch.tensor([t]))
        assert torch.allclose(q.sum(1), torch.ones(1, 2, 2))
    assert torch.allclose(md.q_probs(x0, torch.tensor([0])), x0, atol=1e-3)  # t = 0 ≈ identity
    assert torch.allclose(md.q_probs(x0, torch.tensor([99])), torch.full_like(x0, 0.25), atol=1e-3)  # t = T ≈ uniform
    assert (md.alphas_cumprod[1:] < md.alphas_cumprod[:-1]).all()
    # Sampled noisy labels follow the marginal.
    labels = torch.full((1, 200, 200), 2)
    xt = md.q_sample(labels, torch.tensor([50]), torch.Generator().manual_seed(0))
    keep = float(md.q_probs(x0, torch.tensor([50]))[0, 2, 0, 0])
    assert abs((xt == 2).float().mean().item() - keep) < 0.01


def test_multinomial_posterior_matches_bayes_by_hand():
    md = MultinomialDiffusion(3, timesteps=10)
    t, k = 4, 3
    a_t, a_s = float(md.abar(torch.tensor(t))), float(md.abar(torch.tensor(t - 1)))
    alpha = a_t / a_s
    step = alpha * np.eye(k) + (1 - alpha) / k  # q(x_t = i | x_{t-1} = j) = step[j, i]
    x0 = 1
    prior = a_s * np.eye(k)[x0] + (1 - a_s) / k  # q(x_{t-1} | x_0)
    for xt in range(k):
        bayes = step[:, xt] * prior / (step[:, xt] * prior).sum()
        got = md.posterior(
            torch.eye(k)[xt].reshape(1, k, 1, 1), torch.eye(k)[x0].reshape(1, k, 1, 1), torch.tensor([t])
        )[0, :, 0, 0]
        assert np.allclose(got.numpy(), bayes, atol=1e-6)
    # s = -1 (clean data) returns x_0.
    clean = md.posterior(torch.eye(k)[2].reshape(1, k, 1, 1), torch.eye(k)[x0].reshape(1, k, 1, 1), torch.tensor([0]))
    assert torch.allclose(clean[0, :, 0, 0], torch.eye(k)[x0])


def test_multinomial_loss_and_step():
    md = MultinomialDiffusion(3, timesteps=10)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8), generator=gen)
    t = torch.tensor([0, 5])
    xt = md.q_sample(labels, t, gen)
    perfect = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 40
    assert md.loss(perfect, labels, xt, t).item() < 1e-6  # KL 0 and NLL 0 when x_0 is known
    assert md.loss(torch.zeros_like(perfect), labels, xt, t).item() > 0.01
    x = md.step(perfect, xt, 5, 2, gen)
    assert x.shape == labels.shape and x.dtype == torch.int64 and x.max() < 3
    assert torch.equal(md.step(perfect, xt, 0, -1, gen), labels)  # the last step is the argmax of x_0


def test_hybrid_label_loss_adds_the_clean_label_cross_entropy_at_every_step():
    md = MultinomialDiffusion(3, timesteps=100)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8), generator=gen)
    t = torch.tensor([90, 95])  # late steps: the KL barely depends on x_0 there
    xt = md.q_sample(labels, t, gen)
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).movedim(-1, 1).float() * 5
    ce = torch.nn.functional.cross_entropy(wrong, labels)
    kl = md.loss(wrong, labels, xt, t)
    assert kl.item() < 0.1 * ce.item()  # why the KL alone does not teach x_0 at large t
    assert md.loss(wrong, labels, xt, t, ce_weight=0.5).item() == pytest.approx(kl.item() + 0.5 * ce.item(), rel=1e-5)


def test_point_field_peaks_on_each_centroid_in_its_class_channel():
    enc = PointMapEncoder(num_classes=4, channels=8, out_channels=8, spread=3.0)
    points = torch.zeros(1, 32, 32, dtype=torch.long)
    points[0, 10, 12], points[0, 20, 22] = 2, 3
    field = enc.field(points)
    assert field.shape == (1, 3, 32, 32) and field.min() >= 0 and field.max() <= 1
    assert field[0, 1, 10, 12] == 1 and field[0, 2, 20, 22] == 1 and field[0, 0].max() == 0
    assert 0.5 < field[0, 1, 10, 15] < 0.7  # exp(-9 / 18) three px away
    out = enc(points)
    assert out.shape == (1, 3 + 8, 32, 32)
    # The denoiser sees the field itself in [-1, 1], the scale of its other inputs, not just
    # the encoder's (at first faint) features.
    assert torch.equal(out[:, :3], field * 2 - 1)
    assert torch.equal(PointMapEncoder(4, 8, 8, spread=0.0).field(points)[0, 1], (points[0] == 2).float())


# ---------------------------------------------------------------- joint model


@pytest.mark.slow
def test_joint_model_overfits_a_fixed_batch(overfit):
    _, result, out = overfit
    losses = np.array(result.losses)
    assert len(losses) == 80 and np.isfinite(losses).all()
    assert losses[-15:].mean() < 0.5 * losses[:5].mean()
    assert (out / "model" / "model_index.json").is_file()
    assert [step for step, _ in complete_checkpoints(out / "checkpoints")] == [40, 80]
    assert (out / "samples" / "step-0000080.png").is_file()
    assert any((out / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_samples_have_consistent_shapes_and_values(overfit, data):
    _, result, _ = overfit
    pipe = load_nuclei_pipeline(result.model_dir)
    pts = _points(data, (0, 1, 2))
    out = pipe(pts, ["colon", "breast", 0], guidance_scale=2.0, num_inference_steps=6, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (3, SIZE, SIZE, 3) and out.images.dtype == np.uint8
    assert out.semantic.shape == (3, SIZE, SIZE) and out.semantic.dtype == np.uint8 and out.semantic.max() < K
    assert out.distance.dtype == np.float32 and out.distance.min() >= 0 and out.distance.max() <= 1
    assert (out.distance[out.semantic == 0] == 0).all()
    assert out.instances.shape == (3, SIZE, SIZE) and out.instances.dtype == np.int32
    assert (out.instances[out.semantic == 0] == 0).all()
    for i in range(3):
        # separate_instances: one instance per marker on a nucleus, plus one per (4-connected)
        # foreground blob no marker reaches; small ones are dropped.
        fg, marked = out.semantic[i] > 0, pts[i].numpy() > 0
        blobs, n = ndimage.label(fg)
        unreached = n - len(np.unique(blobs[marked & fg]))
        assert out.instances[i].max() <= int((marked & fg).sum()) + unreached
    assert np.array_equal(out.points, pts.numpy().astype(np.uint8))
    assert (out.semantic > 0).any()  # the trained model draws nuclei
    with pytest.raises(HistopipeError, match="unknown tissue"):
        pipe(pts, "lung", num_inference_steps=1)
    with pytest.raises(HistopipeError, match="out of range"):
        pipe(pts, 2, num_inference_steps=1)
    with pytest.raises(HistopipeError, match="px"):
        pipe(torch.zeros(1, 16, 16, dtype=torch.long), 0, num_inference_steps=1)


@pytest.mark.slow
def test_pipeline_round_trip_gives_identical_outputs(overfit, data, tmp_path):
    task, _, _ = overfit
    pipe = task.pipeline(task.model.eval())
    pipe.save_pretrained(tmp_path / "pipe")
    again = NucleiPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert again.config.class_names == CLASS_NAMES and again.config.tissue_names == TISSUE_NAMES

    def run(p):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return p(_points(data), [0, 1], guidance_scale=1.5, num_inference_steps=4, generator=gens)

    a, b = run(pipe), run(again)
    for field in ("images", "semantic", "distance", "instances"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    c = pipe(_points(data), [0, 1], guidance_scale=1.5, num_inference_steps=4, generator=[torch.Generator().manual_seed(7)] * 2)
    assert not np.array_equal(a.images, c.images)  # the seed matters


@pytest.mark.slow
def test_guidance_one_is_the_conditional_prediction(overfit, data):
    task, _, _ = overfit
    den = task.model.eval()
    pipe = task.pipeline(den)
    pts = _points(data)
    tissue = torch.tensor([0, 1])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, den.gaussian_channels, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, K, (2, SIZE, SIZE), generator=gen)
    t = torch.tensor(50)
    conds = pipe._conditions(den, pts, tissue)
    with torch.no_grad():
        cond = den(x, t, labels, pts, tissue)
        unc = den(x, t, labels, pts, tissue, drop_tissue=torch.ones(2, dtype=torch.bool))
        g1 = pipe.guided_prediction(den, x, t, labels, conds, 1.0)
        g3 = pipe.guided_prediction(den, x, t, labels, conds, 3.0)
    assert torch.allclose(g1.gaussian, cond.gaussian) and torch.allclose(g1.logits, cond.logits)
    assert not torch.allclose(cond.gaussian, unc.gaussian, atol=1e-4)  # the null token is a different condition
    assert torch.allclose(g3.gaussian, unc.gaussian + 3 * (cond.gaussian - unc.gaussian), atol=1e-4)
    lu, lc = unc.logits.log_softmax(1), cond.logits.log_softmax(1)
    assert torch.allclose(g3.logits, lu + 3 * (lc - lu), atol=1e-4)


def test_flips_and_rotations_move_every_map_alike(data):
    batch = reference_batch(data, 8)
    out = flip_rotate(batch, torch.Generator().manual_seed(0))
    changed = 0
    for i in range(8):
        sem, pts, dist, img = out["semantic"][i], out["points"][i], out["distance"][i, 0], out["image"][i]
        assert torch.equal(sem[pts > 0], pts[pts > 0])  # each centroid still on its own nucleus
        assert torch.equal(sem > 0, dist > -1)  # distance still covers exactly the nuclei
        assert torch.equal(img[1] < 0, sem > 0)  # image follows the labels (nuclei have little green)
        assert torch.equal(sem.float().sum(), batch["semantic"][i].float().sum())
        changed += not torch.equal(sem, batch["semantic"][i])
    assert changed > 0


# ---------------------------------------------------------------- latent space, text condition, NuDiff, resume


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=SIZE,
    )


def test_pack_unpack_is_lossless_at_latent_resolution():
    den = JointDenoiser(
        sample_size=SIZE, image_channels=4, num_classes=K, scale_factor=4, point_classes=K, point_channels=8,
        block_out_channels=(32, 64), layers_per_block=1, first_attention_level=1, attention_heads=2, cross_attention_dim=32,
        num_tissues=2,
    )
    latent, dist = torch.randn(2, 4, 8, 8), torch.rand(2, 1, SIZE, SIZE)
    packed = den.pack(latent, dist)
    assert packed.shape == (2, 4 + 16, 8, 8)
    back_latent, back_dist = den.unpack(packed)
    assert torch.equal(back_latent, latent) and torch.equal(back_dist, dist)
    labels = torch.randint(0, K, (2, SIZE, SIZE))
    out = den(packed, torch.tensor([1, 2]), labels, labels * 0, torch.tensor([0, 1]))
    assert out.gaussian.shape == packed.shape and out.logits.shape == (2, K, SIZE, SIZE)  # labels at full resolution


def test_latent_mode_trains_and_samples(data, tmp_path):
    m, s = tiny_model(space="latent"), tiny_train(max_steps=3)
    model_dir = train_nuclei_dataset(data, m, s, CLASS_NAMES, TISSUE_NAMES, tmp_path, vae=_tiny_vae())
    pipe = load_nuclei_pipeline(model_dir)
    assert pipe.vae is not None and pipe.denoiser.config.scale_factor == 2
    assert pipe.denoiser.latent_size == SIZE // 2
    out = pipe(_points(data), "colon", guidance_scale=2.0, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, SIZE, SIZE, 3) and out.semantic.shape == (2, SIZE, SIZE)
    assert out.semantic.max() < K and 0 <= out.distance.min() and out.distance.max() <= 1


def _tiny_clip(folder):
    """A CLIP text encoder + character-level BPE tokenizer built offline, saved like PLIP's folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ",.-_":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=128, pad_token="<|endoftext|>")
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    tok.save_pretrained(folder)
    enc.save_pretrained(folder)
    return folder


def test_text_condition_from_a_local_clip_folder(data, tmp_path):
    folder = _tiny_clip(tmp_path / "clip")
    m, s = tiny_model(tissue_condition="text", text_encoder=str(folder)), tiny_train(max_steps=2)
    model_dir = train_nuclei_dataset(data, m, s, CLASS_NAMES, TISSUE_NAMES, tmp_path / "run")
    pipe = load_nuclei_pipeline(model_dir)
    assert pipe.text_encoder is not None and pipe.tokenizer is not None
    assert pipe.denoiser.tissue_encoder.config.text_dim == 16
    prompts = tissue_prompts(pipe.config.prompt_template, ["colon"], _points(data, (0,)), CLASS_NAMES)
    present = sorted({CLASS_NAMES[c] for c in data[0]["points"].unique().tolist() if c})
    assert prompts[0].startswith("high-quality histopathology colon tissue image including nuclei types of ")
    assert sorted(prompts[0].split(" of ")[1].split(", ")) == present

    def run():
        return pipe(_points(data), ["colon", "breast"], guidance_scale=2.0, num_inference_steps=2, generator=torch.Generator().manual_seed(0))

    a, b = run(), run()
    assert a.images.shape == (2, SIZE, SIZE, 3) and np.array_equal(a.images, b.images)
    with pytest.raises(HistopipeError, match="cannot load a CLIP"):
        load_text_encoder(tmp_path / "nothing")


def test_nudiff_two_step_trains_and_samples(data, tmp_path):
    m, s = tiny_model(mode="nudiff"), tiny_train(max_steps=3, sample_every=3)
    model_dir = train_nuclei_dataset(data, m, s, CLASS_NAMES, TISSUE_NAMES, tmp_path)
    assert (tmp_path / "structure" / "model" / "config.json").is_file()
    assert (tmp_path / "structure" / "samples" / "step-0000003.png").is_file()  # labels grid
    assert (tmp_path / "samples" / "step-0000003.png").is_file()  # image grid over sampled structures
    pipe = load_nuclei_pipeline(model_dir)
    st, im = pipe.structure_denoiser, pipe.denoiser
    assert st.config.image_channels == 0 and st.config.num_classes == K and st.point_encoder is None  # unconditional, as published
    assert im.config.num_classes == 0 and im.config.structure_classes == K and not im.config.distance
    out = pipe(_points(data), [0, 1], guidance_scale=2.0, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, SIZE, SIZE, 3) and out.semantic.shape == (2, SIZE, SIZE) and out.semantic.max() < K
    assert out.instances.dtype == np.int32


def test_train_nuclei_reads_the_config_and_the_store(tmp_path):
    store = _disc_store(tmp_path / "in.zarr", n=8, test=())
    # As YAML would give them (lists, not tuples).
    model = json.loads(json.dumps(dataclasses.asdict(tiny_model())))
    train = json.loads(json.dumps(dataclasses.asdict(tiny_train(max_steps=1))))
    cfg = load_config(None, {"nuclei": {"model": model, "train": train}})
    model_dir = train_nuclei(cfg, store, tmp_path / "run")
    pipe = load_nuclei_pipeline(model_dir)
    assert pipe.config.class_names == CLASS_NAMES and pipe.denoiser.config.num_tissues == len(TISSUE_NAMES)
    bad = load_config(None, {"nuclei": {"model": {**model, "image_size": 64}, "train": train}})
    with pytest.raises(HistopipeError, match="image_size=64"):
        train_nuclei(bad, store, tmp_path / "bad")
    with pytest.raises(HistopipeError, match="no labelled train patches"):
        train_nuclei(cfg, _disc_store(tmp_path / "test_only.zarr", n=2, test=(0, 1)), tmp_path / "none")


def _disc_store(path, n=6, test=(3, 4, 5)):
    """A real nuclei store (Part A's writer) of ``disc_item(0..n-1)``; rows in ``test`` are the test split."""
    writer = NucleiStoreWriter(path, SIZE, CLASS_NAMES, TISSUE_NAMES)
    for i in range(n):
        it = disc_item(i)
        sem = it["semantic"].numpy().astype(np.uint8)
        image = ((it["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        inst = ndimage.label(sem > 0)[0].astype(np.int32)  # discs never touch
        writer.add(NucleiSample(f"d{i}", image, inst, sem, TISSUE_NAMES[int(it["tissue"])]), "test" if i in test else "train")
    return writer.close()


def test_resume_continues_like_an_uninterrupted_run(data, tmp_path):
    def run(out, steps):
        s = tiny_train(max_steps=steps, checkpoint_every=2)
        task = JointTask(tiny_model(), s, CLASS_NAMES, TISSUE_NAMES, reference_batch(data, 2))
        return train(task, data, s, out)

    full = run(tmp_path / "full", 4)
    first = run(tmp_path / "cut", 2)
    second = run(tmp_path / "cut", 4)
    assert first.step == 2 and second.resumed_from == 2 and second.step == 4
    assert np.allclose(full.losses[:2], first.losses, rtol=1e-5)
    assert np.allclose(full.losses[2:], second.losses, rtol=1e-4)


# ---------------------------------------------------------------- layout (HistoSmith)


def _layout(**kw) -> LayoutModel:
    samples = [(points_from_raster(disc_item(i)["points"].numpy()), i % 2) for i in range(40)]
    return LayoutModel.fit(samples, CLASS_NAMES, TISSUE_NAMES, SIZE, S.NucleiLayoutSettings(**kw))


def test_parse_counts():
    assert parse_counts("neutrophil=12, epithelial=80") == {"neutrophil": 12, "epithelial": 80}
    assert parse_counts("lymphocyte=0", CLASS_NAMES) == {"lymphocyte": 0}
    for bad, msg in [("neutrophil", "name=count"), ("neutrophil=x", "not an integer"), ("neutrophil=-1", "negative"),
                     ("neutrophil=1,neutrophil=2", "twice")]:
        with pytest.raises(HistopipeError, match=msg):
            parse_counts(bad)
    with pytest.raises(HistopipeError, match=r"unknown nucleus classes \['macrophage'\].*neutrophil"):
        parse_counts("macrophage=3", CLASS_NAMES)
    with pytest.raises(HistopipeError, match="unknown nucleus classes"):
        parse_counts("background=3", CLASS_NAMES)


def test_layout_honours_counts_and_spacing(tmp_path):
    model = _layout()
    assert model.spacing.shape == (K, K) and (model.spacing[1:, 1:] >= 6).all()  # disc centres lie ≥ 7 px apart
    counts = {"neutrophil": 3, "epithelial": 2, "lymphocyte": 1}
    for seed in range(5):
        pts = model.sample("colon", counts, rng=np.random.default_rng(seed))
        assert pts.shape == (6, 3)
        assert {CLASS_NAMES[c]: int(n) for c, n in zip(*np.unique(pts[:, 2], return_counts=True), strict=True)} == counts
        assert (pts[:, :2] >= 2).all() and (pts[:, :2] <= SIZE - 3).all()
        d = np.sqrt(((pts[:, None, :2] - pts[None, :, :2]) ** 2).sum(-1))
        need = model.spacing[pts[:, 2][:, None], pts[:, 2][None]]
        off = ~np.eye(len(pts), dtype=bool)
        assert (d[off] >= need[off]).all()
    # Crowded beyond the learnt spacing: counts are still exact and no two nuclei share a pixel.
    crowded = model.sample("breast", {"epithelial": 40}, rng=np.random.default_rng(0))
    assert len(crowded) == 40 and len({(y, x) for y, x, _ in crowded}) == 40
    loaded = LayoutModel.load(model.save(tmp_path / "layout.json"))
    a = model.sample("colon", counts, rng=np.random.default_rng(1))
    assert np.array_equal(a, loaded.sample("colon", counts, rng=np.random.default_rng(1)))
    drawn = model.sample("colon", None, rng=np.random.default_rng(0))  # counts seen in training
    assert 2 <= len(drawn) <= 4
    with pytest.raises(HistopipeError, match="unknown nucleus classes"):
        model.sample("colon", {"macrophage": 2})
    with pytest.raises(HistopipeError, match="unknown tissue"):
        model.sample("lung", counts)
    with pytest.raises(HistopipeError, match="do not fit"):
        model.sample("colon", {"epithelial": 10_000})


# ---------------------------------------------------------------- synthesis


@pytest.mark.slow
def test_synthesis_from_test_point_maps_and_from_counts(overfit, tmp_path, monkeypatch):
    _, result, _ = overfit
    store = _disc_store(tmp_path / "in.zarr")
    cfg = load_config(None, {"nuclei": {"synthesis": {"steps": 2, "batch_size": 2, "num_per_layout": 1}}})
    out = synthesize_nuclei(cfg, result.model_dir, store, tmp_path / "syn")
    rows = (out / "manifest.tsv").read_text().strip().split("\n")
    assert rows[0].split("\t")[:5] == ["name", "tissue", "source", "seed", "nuclei"]
    names = [r.split("\t")[0] for r in rows[1:]]
    assert names == ["test000003_0", "test000004_0", "test000005_0"]
    assert not (out / "parts").exists()  # removed once complete
    for name in names:
        for suffix in ("image", "semantic", "instances"):
            assert (out / "png" / f"{name}_{suffix}.png").is_file()
    info = store_info(out / "nuclei.zarr")
    assert info["n_patches"] == 3 and info["splits"] == {"train": 3, "test": 0}
    assert info["class_names"] == CLASS_NAMES and info["tissue_names"] == TISSUE_NAMES and info["patch_size"] == SIZE
    synthetic = NucleiDataset(out / "nuclei.zarr", split=None)
    assert [int(synthetic[i]["tissue"]) for i in range(3)] == [1, 0, 1]  # the test rows' tissues (3 % 2, ...)
    for i in range(3):
        item = synthetic[i]
        assert item["image"].shape == (3, SIZE, SIZE) and item["instances"].dtype == torch.int64
        assert torch.equal(item["semantic"] > 0, item["instances"] > 0)  # labels agree, as in real stores
        assert int((item["points"] > 0).sum()) == int(item["instances"].max())  # one centroid per nucleus
    # An interrupted run resumes: finished parts are not recomputed, and the outputs are the same.
    before = (out / "png" / "test000003_0_image.png").read_bytes()
    calls = []
    real_run_part = synthesis._run_part

    def interrupted(pipe, items, s, path):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_run_part(pipe, items, s, path)

    monkeypatch.setattr(synthesis, "_run_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize_nuclei(cfg, result.model_dir, store, tmp_path / "again")
    assert (tmp_path / "again" / "parts" / "part-00000.npz").is_file() and not (tmp_path / "again" / "manifest.tsv").exists()
    synthesize_nuclei(cfg, result.model_dir, store, tmp_path / "again")
    assert calls == ["part-00000.npz", "part-00001.npz", "part-00001.npz"]
    assert (tmp_path / "again" / "png" / "test000003_0_image.png").read_bytes() == before

    cfg = load_config(None, {"nuclei": {"synthesis": {"steps": 2, "batch_size": 4, "num_images": 3, "write_png": False}}})
    out = synthesize_nuclei(cfg, result.model_dir, store, tmp_path / "counts", counts="neutrophil=2,lymphocyte=1", tissue="colon")
    assert (out / "layout.json").is_file()  # fitted on the store's train split
    rows = [r.split("\t") for r in (out / "manifest.tsv").read_text().strip().split("\n")[1:]]
    assert len(rows) == 3 and all(r[1] == "colon" and r[2] == "counts" and r[5:] == ["2", "0", "1"] for r in rows)
    with pytest.raises(HistopipeError, match="unknown nucleus classes"):
        synthesize_nuclei(cfg, result.model_dir, store, tmp_path / "bad", counts="macrophage=1")


def test_fit_layout_reads_the_store(tmp_path):
    store = _disc_store(tmp_path / "in.zarr")
    model = LayoutModel.load(fit_layout(store, tmp_path / "layout.json"))
    assert model.tissue_names == TISSUE_NAMES and model.size == SIZE
    assert sum(len(v) for v in model.counts.values()) == 3  # the train split only
    assert dataclasses.asdict(model.settings) == dataclasses.asdict(S.NucleiLayoutSettings())


def test_default_model_runs_at_the_papers_256_px():
    """The shipped configuration (256 px pixel space, 64-128-256-256 channels) builds and
    gives one prediction per input of the right shape."""
    from histopipe.nuclei.tasks import build_denoiser

    m = S.model_settings(load_config(None))
    assert m.image_size == 256 and m.space == "pixel"
    torch.manual_seed(0)
    model = build_denoiser(m, "joint", num_classes=7, num_tissues=2).eval()
    sample = torch.randn(1, model.gaussian_channels, 256, 256)
    labels = torch.randint(0, 7, (1, 256, 256))
    points = torch.zeros(1, 256, 256, dtype=torch.long)
    points[0, 100, 50] = 3
    with torch.no_grad():
        out = model(sample, torch.tensor([500]), labels=labels, points=points, tissue=torch.tensor([1]))
    assert out.gaussian.shape == (1, 4, 256, 256) and out.logits.shape == (1, 7, 256, 256)
    assert torch.isfinite(out.gaussian).all() and torch.isfinite(out.logits).all()
