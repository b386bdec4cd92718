"""``histopipe train-vae`` and ``histopipe train-ldm``: train the autoencoder and the
dual-conditioned latent diffusion model on a training-patch store.

Both write into a work folder OUT: ``OUT/model/`` (the ``save_pretrained`` export, renamed
into place when training ends), ``OUT/checkpoints/checkpoint-<step>/`` (resumable state, newest
complete one resumed automatically), ``OUT/logs/`` (TensorBoard) and ``OUT/samples/``.
With ``gpus: N > 1`` in the config section (``vae`` / ``ldm``) the command starts itself in
N processes (torchrun, one per GPU) and waits for them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from histopipe.atomic import atomic_path
from histopipe.config import add_config_args, config_from_args
from histopipe.distributed import relaunch
from histopipe.errors import HistopipeError

log = logging.getLogger(__name__)

_OUT_HELP = (
    "work folder: OUT/model (the trained model, written last), OUT/checkpoints (resumed "
    "automatically after preemption), OUT/logs (TensorBoard), OUT/samples (PNG grids)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-vae",
        help="train the autoencoder (AutoencoderKL) on the training patches",
        description=(
            "Train an AutoencoderKL (config section `vae`: L1 + perceptual + KL, and a patch "
            "discriminator after vae.disc_start) on the train split of a patch store; with "
            "vae.pretrained set, copy that frozen VAE to OUT/model instead. Either way the latent "
            "scaling factor is measured on the store's patches."
        ),
    )
    p.add_argument("--dataset", type=Path, required=True, help="training-patch store patches.zarr (train split trains, val split gives sample grids)")
    p.add_argument("--out", type=Path, required=True, help=_OUT_HELP)
    add_config_args(p)
    p.set_defaults(func=run_vae)

    p = sub.add_parser(
        "train-ldm",
        help="train the map + crop conditioned latent diffusion model",
        description=(
            "Train the latent diffusion model (config section `ldm`: variant, sizes, schedule) "
            "on the train split of a patch store, in the latent space of a trained VAE."
        ),
    )
    p.add_argument("--dataset", type=Path, required=True, help="training-patch store patches.zarr")
    p.add_argument("--vae", type=Path, required=True, help="AutoencoderKL folder (OUT/model of train-vae, or a pretrained diffusers VAE / pipeline folder)")
    p.add_argument("--out", type=Path, required=True, help=_OUT_HELP)
    p.add_argument(
        "--segmenter", type=Path,
        help="real-arm segmenter (evaluate-segmentation --mode real --model-out): adds label fidelity to the progress evaluations",
    )
    add_config_args(p)
    p.set_defaults(func=run_ldm)


def _datasets(path: Path, memory_mb: float):
    """Train split, the split that gives sample grids and evaluations (val, else train) and the
    store's attributes."""
    from histopipe.diffusion.data import open_training_set, store_info

    info = store_info(path)
    train_set = open_training_set(path, "train", memory_mb)
    if len(train_set) == 0:
        raise HistopipeError(f"{path}: the train split is empty")
    val_set = open_training_set(path, "val")
    return train_set, (val_set if len(val_set) else train_set), info


def _monitor(s, val_set, reference: dict, segmenter: str | None = None):
    """Progress evaluations on the first ``eval_samples`` reference patches; other val patches
    of the same number give the FD real tissue reaches at that size."""
    from histopipe.diffusion.monitor import SampleMonitor
    from histopipe.diffusion.pipeline import to_uint8
    from histopipe.diffusion.tasks import other_batch

    other = other_batch(val_set, s.eval_samples, len(reference["image"]))
    return SampleMonitor(to_uint8(reference["image"][: s.eval_samples]), s.eval_encoder, segmenter,
                         None if other is None else to_uint8(other["image"]))


def run_vae(args: argparse.Namespace) -> int:
    from histopipe.diffusion.models import load_vae
    from histopipe.diffusion.settings import vae_settings
    from histopipe.diffusion.tasks import VAETask, reference_batch, set_latent_scaling
    from histopipe.diffusion.training import MODEL_DIR, train

    s = vae_settings(config_from_args(args))
    if not s.pretrained and (rc := relaunch(s.gpus, args.argv, s.batch_size, "vae")) is not None:
        return rc
    train_set, val_set, info = _datasets(args.dataset, s.memory_mb)
    scale_images = reference_batch(train_set, s.scale_samples, spread=True)["image"]
    if s.pretrained:
        vae = load_vae(s.pretrained)
        before = vae.config.scaling_factor
        factor = set_latent_scaling(vae, scale_images)
        with atomic_path(args.out / MODEL_DIR) as tmp:
            vae.save_pretrained(tmp)
        log.info("copied the pretrained VAE %s to %s (scaling factor %.5f measured on the patches; it shipped with %s)",
                 s.pretrained, args.out / MODEL_DIR, factor, before)
        return 0
    reference = reference_batch(val_set, max(s.eval_samples, 8), spread=True)
    monitor = _monitor(s, val_set, reference) if s.eval_every else None
    task = VAETask(s, info["patch_size"], reference, scale_images, monitor)
    result = train(task, train_set, s, args.out)
    log.info("VAE trained to step %d: %s", result.step, result.model_dir)
    return 0


def run_ldm(args: argparse.Namespace) -> int:
    from histopipe.diffusion.models import load_vae
    from histopipe.diffusion.settings import ldm_settings
    from histopipe.diffusion.tasks import LDMTask, reference_batch
    from histopipe.diffusion.training import train
    from histopipe.label_space import LabelSpace

    s = ldm_settings(config_from_args(args))
    if (rc := relaunch(s.gpus, args.argv, s.batch_size, "ldm")) is not None:
        return rc
    vae = load_vae(args.vae)
    train_set, val_set, info = _datasets(args.dataset, s.memory_mb)
    reference = reference_batch(val_set, max(s.eval_samples, 8), spread=True)
    monitor = _monitor(s, val_set, reference, args.segmenter) if s.eval_every else None
    task = LDMTask(
        s, vae, info["patch_size"], info["level_luts"], reference,
        label_names=info["label_names"], mpp=info.get("mpp"), monitor=monitor,
        label_space=LabelSpace.from_attrs(info).to_dict(),
    )
    result = train(task, train_set, s, args.out)
    log.info("LDM (%s) trained to step %d: %s", s.variant, result.step, result.model_dir)
    return 0
