"""The GPU check: what one CUDA GPU does for histopipe, in one command (under 8 minutes).

    python benchmarks/gpu_check.py                  # CUDA: full sizes (make gpu-check)
    python benchmarks/gpu_check.py --smoke          # CPU, tiny sizes, seconds (tests)

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (default out: results/gpu_check):

- embedding: tiles/s end to end (tiles read from a generated 40× slide, 0.25 µm/px, by the
  production loader with DataLoader workers, bf16, written to an embedding store) against
  the model alone on tensors already on the device, for UNI's architecture (ViT-L/16,
  random weights) and efficientnet_lite0;
- the ``base`` LDM with a ControlNet branch (variant map + raw crops, injection
  controlnet): training images/s and peak memory at 256 and 512 px in bf16, sampling
  images/s with DPM-Solver++ (25 steps) and classifier-free guidance, VAE encode and
  decode images/s;
- the GPU's name, driver, torch and CUDA versions.

Targets on an H100-class GPU: ViT-L end to end ≥ 80 % of model-only and ≥ 2 000 tiles/s.
Smoke mode runs every step on the CPU with the tiny preset, a small slide and ViT-Ti in
place of ViT-L, so the script cannot rot without a test noticing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.diffusion import sync, synthetic_batch  # noqa: E402
from histopipe.atomic import atomic_path, atomic_write_text  # noqa: E402
from histopipe.config import load_preset  # noqa: E402
from histopipe.demo import _read_full, fetch_cmu_slide  # noqa: E402
from histopipe.diffusion.conditioning import slots_from_image  # noqa: E402
from histopipe.diffusion.models import build_vae  # noqa: E402
from histopipe.diffusion.settings import ldm_settings, vae_settings  # noqa: E402
from histopipe.diffusion.tasks import LDMTask  # noqa: E402
from histopipe.embedding import EmbeddingConfig, embed_tiles  # noqa: E402
from histopipe.encoders import get_encoder  # noqa: E402
from histopipe.tiling import TileStore, TilingConfig, tile_slide  # noqa: E402

TILE = 256
SLIDE_MPP = 0.25  # 40×


@dataclass(frozen=True)
class Sizes:
    """Everything the check sizes: the full run on a GPU, the smoke run on a CPU."""

    device: str
    preset: str
    slide_px: int  # side of the generated 40× slide
    max_tiles: int
    encoders: tuple[tuple[str, str, int], ...]  # (label, registry name, batch)
    num_workers: int
    image_sizes: tuple[int, ...]
    train_batch: int
    train_steps: int
    sample_batch: int
    sample_steps: int
    vae_batch: int
    precision: str


FULL = Sizes(
    device="cuda", preset="base", slide_px=40000, max_tiles=12000,
    encoders=(("ViT-L/16 (UNI)", "uni", 256), ("efficientnet_lite0", "efficientnet_lite0", 512)),
    num_workers=min(16, os.cpu_count() or 1), image_sizes=(256, 512), train_batch=32, train_steps=10,
    sample_batch=16, sample_steps=25, vae_batch=16, precision="bf16",
)
SMOKE = Sizes(
    device="cpu", preset="tiny", slide_px=2048, max_tiles=6,
    encoders=(("ViT-Ti/16 (smoke stand-in for ViT-L)", "timm:vit_tiny_patch16_224", 2), ("efficientnet_lite0", "efficientnet_lite0", 2)),
    num_workers=1, image_sizes=(32,), train_batch=2, train_steps=1, sample_batch=1, sample_steps=2, vae_batch=2,
    precision="fp32",
)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def amp_dtype(sizes: Sizes) -> torch.dtype | None:
    return torch.bfloat16 if sizes.precision == "bf16" else None


def system_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device), "cpu_cores": os.cpu_count(),
            "python": platform.python_version(), "gpu": None, "driver": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


# --- the 40× slide ----------------------------------------------------------------------
def generated_slide(folder: Path, side: int) -> Path:
    """An Aperio-style JPEG pyramid of side × side px at 0.25 µm/px (levels 1, 4, 16), made of
    the real CMU-1 region mirrored (tissue everywhere, no seams)."""
    img = _read_full(fetch_cmu_slide())
    top = np.concatenate([img, img[:, ::-1]], axis=1)
    block = np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))
    ph, pw = block.shape[:2]

    def level0_tiles():
        for ty in range(math.ceil(side / TILE)):
            band = block[(ty * TILE + np.arange(TILE)) % ph]
            for tx in range(math.ceil(side / TILE)):
                yield band[:, (tx * TILE + np.arange(TILE)) % pw]

    def reduced(factor: int) -> np.ndarray:
        small = cv2.resize(block, (pw // factor, ph // factor), interpolation=cv2.INTER_AREA)
        reps = (math.ceil(side / factor / small.shape[0]), math.ceil(side / factor / small.shape[1]), 1)
        return np.ascontiguousarray(np.tile(small, reps)[: side // factor, : side // factor])

    path = folder / f"generated_40x_{side}.svs"
    jpeg = {"compression": "jpeg", "compressionargs": {"level": 80, "outcolorspace": "RGB"}, "subsampling": (1, 1)}
    head = "Aperio Image Library v12.0.15\r\n"
    res = {"resolution": (1e4 / SLIDE_MPP, 1e4 / SLIDE_MPP), "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(level0_tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", metadata=None,
                  maxworkers=os.cpu_count(),
                  description=f"{head}{side}x{side} [0,0 {side}x{side}] ({TILE}x{TILE}) JPEG/RGB Q=80|AppMag = 40|MPP = {SLIDE_MPP}",
                  **jpeg, **res)
        thumb = reduced(16)
        tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None, description=f"{head}thumbnail")
        for f in (4, 16):
            lvl = reduced(f)
            tif.write(lvl, tile=(TILE, TILE), photometric="rgb", metadata=None,
                      description=f"{head}{side}x{side} -> {lvl.shape[1]}x{lvl.shape[0]} JPEG/RGB Q=80", **jpeg)
    return path


# --- embedding --------------------------------------------------------------------------
def model_only(encoder, batch: int, amp: torch.dtype | None, seconds: float) -> float:
    """Images/s of normalise + forward on uint8 batches already on the device."""
    size = encoder.spec.input_size
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=encoder.device)
    n = 0
    with torch.inference_mode(), torch.autocast(encoder.device.type, dtype=amp, enabled=amp is not None):
        encoder(encoder.normalize(x).contiguous(memory_format=torch.channels_last))  # warm-up
        sync(encoder.device)
        t0 = time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:
            encoder(encoder.normalize(x).contiguous(memory_format=torch.channels_last))
            n += batch
            if encoder.device.type != "cuda" and n >= 2 * batch:
                break
        sync(encoder.device)
    return n / (time.perf_counter() - t0)


def check_embedding(sizes: Sizes, device: torch.device, folder: Path) -> list[dict]:
    slide = generated_slide(folder, sizes.slide_px)
    store = folder / "tiles.zarr"
    # 256 px tiles at 0.5 µm/px (20×): level 0 read at 512 px and halved, the common case.
    tile_slide(slide, store, "generated", TilingConfig(mpp=0.5, tile_size=TILE, min_tissue=0.0))
    tiles = TileStore(store)
    if len(tiles) > sizes.max_tiles:
        from histopipe.tiling import write_tile_store

        sub = folder / "tiles_sub.zarr"
        write_tile_store(sub, tiles.coords[: sizes.max_tiles], tiles.tissue_fraction[: sizes.max_tiles],
                         dict(tiles.attrs, n_tiles=sizes.max_tiles))
        store = sub
    n = len(TileStore(store))
    rows = []
    for label, name, batch in sizes.encoders:
        torch.manual_seed(0)
        encoder = get_encoder(name, device=device, pretrained=False)
        amp = amp_dtype(sizes)
        reference = model_only(encoder, batch, amp, seconds=10.0)
        cfg = EmbeddingConfig(batch_size=batch, num_workers=sizes.num_workers, precision=sizes.precision, dtype="float16")
        embed_tiles(store, folder / "warm.zarr", cfg, encoder=encoder, force=True, progress=False)  # workers, cuDNN warm
        r = embed_tiles(store, folder / f"{name.replace(':', '-')}.zarr", cfg, encoder=encoder, force=True, progress=False)
        rate = r.n_tiles / r.seconds
        rows.append({"encoder": label, "name": name, "params_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 1),
                     "batch": batch, "workers": sizes.num_workers, "tiles": n, "end_to_end_tiles_s": round(rate, 1),
                     "model_only_tiles_s": round(reference, 1), "ratio": round(rate / reference, 3)})
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- the LDM and its VAE ----------------------------------------------------------------
def check_ldm(sizes: Sizes, device: torch.device, size: int) -> dict:
    cfg = load_preset(sizes.preset, {"ldm": {"variant": "map_crops", "injection": "controlnet"}})
    vae_s, ldm_s = vae_settings(cfg), ldm_settings(cfg)
    num_labels = 33
    amp = amp_dtype(sizes)
    torch.manual_seed(0)
    task = LDMTask(ldm_s, build_vae(vae_s, size), size, np.arange(num_labels)[None], {})
    task.to(device, amp or torch.float32)
    model = task.model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    batch = {k: v.to(device) for k, v in synthetic_batch(sizes.train_batch, size, ldm_s.max_crops, num_labels).items()}
    gen = torch.Generator(device=device).manual_seed(0)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = task.loss(model, batch, gen, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    step(0)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for i in range(sizes.train_steps):
        step(i + 1)
    sync(device)
    out = {"size": size, "trained_params_m": round(sum(p.numel() for p in params) / 1e6, 1), "train_batch": sizes.train_batch,
           "train_images_s": round(sizes.train_batch * sizes.train_steps / (time.perf_counter() - t0), 2),
           "train_peak_gib": peak_gib(device)}
    opt.state.clear()  # the Adam moments are not needed for sampling
    model.eval()
    pipe = task.pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    if amp is not None:
        pipe.to(device, amp)
    pipe.use_sampler("dpmpp")
    sample = {k: v[: sizes.sample_batch] for k, v in batch.items()}
    slots = slots_from_image(sample["image"], sample["crop_boxes"], sample["crop_labels"], sample["crop_valid"], ldm_s.max_crops)
    with torch.inference_mode():
        pipe(sample["map"], slots, num_inference_steps=2, guidance_scale=2.0)  # warm-up
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        pipe(sample["map"], slots, num_inference_steps=sizes.sample_steps, guidance_scale=2.0,
             generator=torch.Generator(device=device).manual_seed(0))
        sync(device)
        out.update(sample_batch=sizes.sample_batch, sample_steps=sizes.sample_steps,
                   sample_images_s=round(sizes.sample_batch / (time.perf_counter() - t0), 3), sample_peak_gib=peak_gib(device))
        vae = task.vae
        images = batch["image"][: sizes.vae_batch]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            latents = vae.encode(images).latent_dist.mode()
            vae.decode(latents)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            latents = vae.encode(images).latent_dist.mode()
            sync(device)
            t1 = time.perf_counter()
            vae.decode(latents)
            sync(device)
            t2 = time.perf_counter()
    out.update(vae_batch=len(images), vae_encode_images_s=round(len(images) / (t1 - t0), 2),
               vae_decode_images_s=round(len(images) / (t2 - t1), 2))
    return out


# --- report -----------------------------------------------------------------------------
def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    s = result["system"]
    lines = [f"# GPU check ({result['mode']})", "",
             f"GPU: {s['gpu'] or 'none (CPU)'}; driver {s['driver'] or 'n/a'}; torch {s['torch']}; CUDA {s['cuda'] or 'n/a'}; "
             f"{s['cpu_cores']} CPU cores; {result['seconds']:.0f} s in all.", "",
             "## Embedding (generated 40× slide, 256 px tiles at 0.5 µm/px, production loader)", "",
             "| encoder | params (M) | batch | workers | tiles | end to end (tiles/s) | model only (tiles/s) | end to end / model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["embedding"]:
        lines.append(f"| {r['encoder']} | {r['params_m']} | {r['batch']} | {r['workers']} | {r['tiles']} | "
                     f"{r['end_to_end_tiles_s']} | {r['model_only_tiles_s']} | {r['ratio']:.2f} |")
    lines += ["", f"## LDM `{result['preset']}` + ControlNet branch (map + raw crops), {result['precision']}", "",
              "| size px | trained params (M) | train batch | train img/s | train peak GiB | DPM++ 25 + CFG img/s | sampling peak GiB | VAE encode img/s | VAE decode img/s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["ldm"]:
        lines.append(f"| {r['size']} | {r['trained_params_m']} | {r['train_batch']} | {r['train_images_s']} | {_fmt(r['train_peak_gib'])} | "
                     f"{r['sample_images_s']} | {_fmt(r['sample_peak_gib'])} | {r['vae_encode_images_s']} | {r['vae_decode_images_s']} |")
    t = result["targets"]
    lines += ["", "## Targets (H100 class)", "",
              f"- ViT-L end to end ≥ 80 % of model-only: {t['vit_l_ratio']} → {'met' if t['ratio_met'] else 'not met'}",
              f"- ViT-L end to end ≥ 2000 tiles/s: {t['vit_l_tiles_s']} → {'met' if t['rate_met'] else 'not met'}"]
    if result["mode"] == "smoke":
        lines.append("- smoke mode (CPU, tiny sizes, ViT-Ti in place of ViT-L): the figures only show that the check runs.")
    return "\n".join(lines) + "\n"


def run(sizes: Sizes, out: Path, mode: str) -> dict:
    t0 = time.perf_counter()
    device = torch.device(sizes.device)
    result = {"mode": mode, "preset": sizes.preset, "precision": sizes.precision, "system": system_info(device)}
    with tempfile.TemporaryDirectory() as tmp:
        result["embedding"] = check_embedding(sizes, device, Path(tmp))
    result["ldm"] = []
    for size in sizes.image_sizes:
        result["ldm"].append(check_ldm(sizes, device, size))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    vit = result["embedding"][0]
    result["targets"] = {"vit_l_ratio": vit["ratio"], "vit_l_tiles_s": vit["end_to_end_tiles_s"],
                         "ratio_met": vit["ratio"] >= 0.8, "rate_met": vit["end_to_end_tiles_s"] >= 2000}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gpu_check.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "gpu_check.md", markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (seconds): checks that the script runs")
    ap.add_argument("--out", type=Path, default=Path("results/gpu_check"), help="folder for gpu_check.json and gpu_check.md")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (use --smoke for the CPU smoke run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    result = run(SMOKE if args.smoke else FULL, args.out, "smoke" if args.smoke else "full")
    print(markdown(result))
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
