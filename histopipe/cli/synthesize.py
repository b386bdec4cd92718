"""``histopipe synthesize`` (image–label pairs from a trained pipeline) and
``histopipe flag-hallucinations`` (distance of each synthetic image to the real tiles)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from histopipe.atomic import atomic_write_text
from histopipe.config import add_config_args, config_from_args
from histopipe.errors import HistopipeError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synthesize",
        help="synthesize image-label pairs from maps and crops",
        description=(
            "Generate images with a trained pipeline (config section `synthesis`: sampler, steps, "
            "guidance, seed). Modes: held-out = maps of a patch-store split with their own crops; "
            "user-map = PNG maps of tissue-type ids (image size of the model, px) with crop images "
            "per type in CROPS/<label>/*.png; crop-bank = maps of a split with crops drawn from the "
            "crop bank. Writes OUT/synthetic.zarr, OUT/images/*.png, OUT/labels/*.png (16-bit ids) "
            "and OUT/manifest.csv|json; an interrupted run resumes from its finished batches."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="pipeline folder (OUT/model of train-ldm, or a checkpoint's model/)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--mode", choices=("held-out", "user-map", "crop-bank"), required=True, help="where maps and crops come from")
    p.add_argument("--dataset", type=Path, help="patch store patches.zarr (held-out, crop-bank)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split of --dataset whose maps are used (default test)")
    p.add_argument("--crop-bank", type=Path, help="crop bank crop_bank.zarr (crop-bank)")
    p.add_argument("--map", type=Path, nargs="+", help="map PNG(s) of tissue-type ids (user-map)")
    p.add_argument("--crops", type=Path, help="folder of crop images per tissue type: <label>/*.png, label = id or name (user-map)")
    add_config_args(p)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.set_defaults(func=run_synthesize)

    p = sub.add_parser(
        "flag-hallucinations",
        help="score synthetic images by their distance to real tiles and flag outliers",
        description=(
            "Embed synthetic and real images with an encoder of the registry (synthesis.flag_encoder), "
            "score each synthetic image by the mean distance to its synthesis.flag_k nearest real "
            "images (faiss), and flag it above the synthesis.flag_quantile quantile of the real "
            "images' leave-one-out scores. Writes OUT (CSV: id, score, flagged) and OUT with suffix .json (summary)."
        ),
    )
    p.add_argument("--synthetic", type=Path, required=True, help="synthetic.zarr written by synthesize")
    p.add_argument("--real", type=Path, required=True, help="patch store patches.zarr of the real data")
    p.add_argument("--real-split", default="train", choices=("train", "val", "test"), help="split of --real used as reference (default train)")
    p.add_argument("--out", type=Path, required=True, help="flags CSV")
    add_config_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=run_flag)


def _stamp(folder: Path) -> str:
    """Newest modification time (ns) and total size of the files of a model folder."""
    files = [p.stat() for p in folder.rglob("*") if p.is_file()]
    return f"{max((f.st_mtime_ns for f in files), default=0)}-{sum(f.st_size for f in files)}"


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_pipeline(path: Path, device):
    import torch

    from histopipe.diffusion.pipeline import HistoSynthesisPipeline

    if not (path / "model_index.json").is_file():
        raise HistopipeError(f"{path}: not a pipeline folder (no model_index.json); give OUT/model of train-ldm")
    try:
        pipe = HistoSynthesisPipeline.from_pretrained(path)
    except Exception as err:
        raise HistopipeError(f"{path}: cannot load the pipeline ({type(err).__name__}: {err})") from None
    return pipe.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def run_synthesize(args: argparse.Namespace) -> int:
    from histopipe.diffusion import synthesis as syn
    from histopipe.diffusion.data import BankCrops, PatchRows
    from histopipe.diffusion.settings import synthesis_settings
    from histopipe.distributed import local_device, relaunch
    from histopipe.label_space import check_dataset, pipeline_label_space

    s = synthesis_settings(config_from_args(args))
    if (rc := relaunch(s.gpus, args.argv, None, "synthesis")) is not None:
        return rc
    pipe = load_pipeline(args.model, local_device(_device(args.device)))
    max_crops = int(pipe.config.max_crops)  # 0 for the variants that read no crops
    # The stamp makes parts of an interrupted run with an older model of the same path stale.
    meta = {"model": str(args.model), "model_stamp": _stamp(args.model), "mode": args.mode}
    level_luts = None
    if args.mode in ("held-out", "crop-bank"):
        if args.dataset is None:
            raise HistopipeError(f"--mode {args.mode} needs --dataset")
        store = PatchRows(args.dataset, args.split)
        check_dataset(pipeline_label_space(dict(pipe.config)), dict(store.root.attrs), args.model, args.dataset)
        level_luts = store.level_luts
        meta.update(dataset=str(args.dataset), split=args.split)
        if args.mode == "held-out":
            # Variants that read no crops still record the map's own crops (provenance, and
            # the null level of crop fidelity).
            crops = max_crops or int(store.root.attrs.get("max_crops", 0))
            items = syn.held_out_items(store, crops, s.seed, s.limit, s.level, s.held_out_repeats)
        else:
            if args.crop_bank is None:
                raise HistopipeError("--mode crop-bank needs --crop-bank")
            if s.level:
                raise HistopipeError("crop-bank synthesis works on the finest map level (synthesis.level: 0)")
            meta["crop_bank"] = str(args.crop_bank)
            items = syn.bank_items(store, BankCrops(args.crop_bank), max_crops, s.seed, s.limit, s.min_crop_side)
    else:
        if not args.map:
            raise HistopipeError("--mode user-map needs --map")
        needs_crops = pipe.variant in ("map_crops", "map_crop_embeddings")
        if needs_crops and args.crops is None:
            raise HistopipeError(f"the {pipe.variant} model needs --crops (folder of <label>/*.png)")
        crops = syn.read_crop_folder(args.crops, list(pipe.config.label_names)) if args.crops else None
        meta.update(maps=[str(m) for m in args.map], crops=str(args.crops) if args.crops else None)
        items = syn.user_map_items(args.map, crops, s.num_per_map, max_crops, s.seed, s.min_crop_side)
    manifest = syn.synthesize(pipe, items, args.out, s, meta, level_luts)
    log.info("%d image-label pairs: %s", len(items), manifest)
    return 0


def _embed(encoder, images, indices: np.ndarray, batch: int = 64) -> np.ndarray:
    """Features (N, D) of ``images[indices]`` (a zarr array of uint8 (N, S, S, 3)), read in batches."""
    import torch

    feats = []
    with torch.no_grad():
        for i in range(0, len(indices), batch):
            chunk = np.asarray(images.get_orthogonal_selection((indices[i : i + batch],)))
            feats.append(encoder.embed(chunk).float().cpu().numpy())
    return np.concatenate(feats)


def run_flag(args: argparse.Namespace) -> int:
    import zarr

    from histopipe.diffusion.data import PatchRows
    from histopipe.diffusion.flagging import flag_hallucinations
    from histopipe.diffusion.settings import synthesis_settings

    s = synthesis_settings(config_from_args(args))
    try:
        synthetic = zarr.open_group(str(args.synthetic), mode="r")
        _ = synthetic["images"], synthetic["item_id"]
    except Exception as err:
        raise HistopipeError(f"{args.synthetic}: not a synthetic store written by synthesize: {err}") from None
    real = PatchRows(args.real, args.real_split)
    if len(real) <= s.flag_k:
        raise HistopipeError(f"{args.real}: split {args.real_split} has {len(real)} patches; need more than flag_k={s.flag_k}")
    try:
        from histopipe.encoders import get_encoder
    except ImportError as err:
        raise HistopipeError(f"the encoder registry (histopipe.encoders) is not available: {err}") from None
    encoder = get_encoder(s.flag_encoder, device=str(_device(args.device)))
    encoder.eval()
    real_images = real.root["images"]
    syn_feats = _embed(encoder, synthetic["images"], np.arange(synthetic["images"].shape[0]))
    real_feats = _embed(encoder, real_images, real.indices)
    flags = flag_hallucinations(syn_feats, real_feats, s.flag_k, s.flag_quantile, s.flag_normalize)
    ids = [str(v) for v in synthetic["item_id"][:]]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "score", "flagged"])
    for i, score, flagged in zip(ids, flags.scores, flags.flagged, strict=True):
        w.writerow([i, f"{score:.6g}", int(flagged)])
    atomic_write_text(args.out, buf.getvalue())
    summary = {
        "encoder": s.flag_encoder, "k": s.flag_k, "quantile": s.flag_quantile, "normalize": s.flag_normalize,
        "threshold": flags.threshold, "n_synthetic": len(ids), "n_flagged": int(flags.flagged.sum()),
        "n_real": len(real), "real_split": args.real_split, "synthetic": str(args.synthetic), "real": str(args.real),
    }
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(summary, indent=1))
    log.info("%d of %d synthetic images flagged (threshold %.4g)", summary["n_flagged"], len(ids), flags.threshold)
    return 0
