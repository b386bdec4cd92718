"""Entry points: train the nuclei model(s) on a nuclei store and load the result.

Joint mode trains one ``JointTask`` into ``out_dir``; NuDiff trains ``StructureTask`` into
``out_dir/structure`` and then ``ImageTask`` into ``out_dir``. Both go through the shared
loop, so checkpoints, resumption, EMA and TensorBoard work as for the LDM; the returned
``out_dir/model`` is a ``NucleiPipeline`` folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import Dataset

from histopipe.diffusion.models import load_vae
from histopipe.diffusion.tasks import reference_batch
from histopipe.diffusion.training import MODEL_DIR, train
from histopipe.errors import ConfigError, WeightsError
from histopipe.nuclei.dataset import NucleiDataset
from histopipe.nuclei.model import JointDenoiser
from histopipe.nuclei.pipeline import NucleiPipeline
from histopipe.nuclei.settings import (
    NucleiModelSettings,
    NucleiTrainSettings,
    model_settings,
    train_settings,
)
from histopipe.nuclei.tasks import ImageTask, JointTask, StructureTask


def load_text_encoder(folder: str | Path) -> tuple:
    """(CLIPTokenizer, CLIPTextModel) from a local folder (e.g. PLIP's); nothing is downloaded."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise WeightsError(f"{folder}: cannot load a CLIP text encoder + tokenizer ({type(err).__name__}: {err})") from None
    return tokenizer, encoder


def train_nuclei_dataset(
    dataset: Dataset,
    m: NucleiModelSettings,
    s: NucleiTrainSettings,
    class_names: list[str],
    tissue_names: list[str],
    out_dir: str | Path,
    vae: AutoencoderKL | None = None,
    text: tuple | None = None,
    held_out: Dataset | None = None,
) -> Path:
    """Train on any dataset of Part A's tensor dicts; returns the pipeline folder ``out_dir/model``.

    ``held_out`` (default: the training set) gives the sample grids and the progress
    evaluations (placement F1 and class accuracy, every ``eval_every`` steps)."""
    out_dir = Path(out_dir)
    if m.space == "latent" and vae is None:
        raise ConfigError("config.nuclei.model.space is latent: a VAE is needed")
    if m.tissue_condition == "text" and text is None:
        text = load_text_encoder(m.text_encoder)
    item = dataset[0]
    if item["image"].shape[-1] != m.image_size:
        raise ConfigError(f"config.nuclei.model.image_size={m.image_size} but the patches are {item['image'].shape[-1]} px")
    reference = reference_batch(held_out if held_out is not None and len(held_out) else dataset, max(s.eval_samples, 4), spread=True)
    common = dict(class_names=class_names, tissue_names=tissue_names, reference=reference, vae=vae if m.space == "latent" else None, text=text)
    if m.mode == "joint":
        task = JointTask(m, s, **common)
        return train(task, dataset, s, out_dir).model_dir
    structure_dir = out_dir / "structure"
    train(StructureTask(m, s, **common), dataset, s, structure_dir)
    structure = JointDenoiser.from_pretrained(structure_dir / MODEL_DIR)
    task = ImageTask(m, s, structure=structure, **common)
    return train(task, dataset, s, out_dir).model_dir


def train_nuclei(cfg: dict, store: str | Path, out_dir: str | Path, vae: str | Path | None = None) -> Path:
    """Train the configured nuclei model on the train split of Part A's store ``store``.

    ``vae``: the workflow's trained VAE folder, used in latent space when
    ``nuclei.model.vae_pretrained`` is null. Returns the pipeline folder ``out_dir/model``.
    """
    m, s = model_settings(cfg), train_settings(cfg)
    dataset = NucleiDataset(store, split="train")
    if not dataset.labels or len(dataset) == 0:
        raise ConfigError(f"{store}: no labelled train patches to train the nuclei model on")
    vae_model = None
    if m.space == "latent":
        path = m.vae_pretrained or vae
        if path is None:
            raise ConfigError("config.nuclei.model.space is latent: set nuclei.model.vae_pretrained or train the workflow's VAE")
        vae_model = load_vae(path)
    # Nuclei stores split into train and test: the progress evaluations sample test point maps
    # (no gradient ever sees them).
    held_out = NucleiDataset(store, split="test")
    return train_nuclei_dataset(dataset, m, s, list(dataset.class_names), list(dataset.tissue_names), out_dir, vae_model,
                                held_out=held_out)


def load_nuclei_pipeline(model_dir: str | Path, device: str | torch.device | None = None) -> NucleiPipeline:
    """The trained ``NucleiPipeline`` in ``model_dir`` (a ``save_pretrained`` folder)."""
    folder = Path(model_dir)
    if not (folder / "model_index.json").is_file():
        raise WeightsError(f"{folder}: no nuclei pipeline here (model_index.json missing)")
    pipe = NucleiPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe
