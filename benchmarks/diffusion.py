"""Throughput of the dual-conditioned latent diffusion model: training and sampling.

Measures, per image size: training images/s (loss + backward + AdamW step of the map + raw
crops model on frozen-VAE latents; bf16 autocast on CUDA), sampling images/s with
DPM-Solver++ (25 steps) and DDPM (1000 steps), both with classifier-free guidance, and peak
memory (CUDA: max allocated; CPU: process peak RSS). Models are randomly initialised: speed
does not depend on the weights.

    python benchmarks/diffusion.py                      # CUDA: base config at 256 and 512 px
    python benchmarks/diffusion.py --preset tiny --sizes 32 64 --threads 2   # CPU

``--preset`` names a model preset of config/presets/ (``tiny``, ``cpu``, ``base``, ``large``).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from histopipe.config import load_preset  # noqa: E402
from histopipe.diffusion.conditioning import slots_from_image  # noqa: E402
from histopipe.diffusion.models import build_vae  # noqa: E402
from histopipe.diffusion.settings import ldm_settings, vae_settings  # noqa: E402
from histopipe.diffusion.tasks import LDMTask  # noqa: E402

PRESETS = ("tiny", "cpu", "base", "large")


def synthetic_batch(n: int, size: int, max_crops: int, num_labels: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """n patches with 3 rectangular regions each and one crop per region."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.uniform(-1, 1, (n, 3, size, size)).astype(np.float32))
    maps = torch.zeros(n, size, size, dtype=torch.long)
    boxes = torch.zeros(n, max_crops, 3, dtype=torch.long)
    labels = torch.zeros(n, max_crops, dtype=torch.long)
    valid = torch.zeros(n, max_crops, dtype=torch.bool)
    half = size // 2
    for i in range(n):
        types = rng.choice(np.arange(1, num_labels), 3, replace=False)
        maps[i, :half], maps[i, half:, :half], maps[i, half:, half:] = (int(t) for t in types)
        side = size // 4
        for k, (y, x) in enumerate([(0, 0), (half, 0), (half, half)][:max_crops]):
            boxes[i, k] = torch.tensor([y + 2, x + 2, side])
            labels[i, k], valid[i, k] = int(types[k]), True
    return {"image": images, "map": maps, "crop_boxes": boxes, "crop_labels": labels, "crop_valid": valid}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_size(args, size: int, device: torch.device) -> dict[str, float]:
    cfg = load_preset(args.preset)
    vae_s, ldm_s = vae_settings(cfg), ldm_settings(cfg)
    num_labels = 101  # 100 tissue types + background, as with the paper's TCGA clustering
    luts = np.arange(num_labels)[None]
    torch.manual_seed(0)
    vae = build_vae(vae_s, size)
    task = LDMTask(ldm_s, vae, size, luts, {})
    amp = torch.bfloat16 if device.type == "cuda" else None
    task.to(device, amp or torch.float32)
    model = task.model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = {k: v.to(device) for k, v in synthetic_batch(args.batch, size, ldm_s.max_crops, num_labels).items()}
    gen = torch.Generator(device=device).manual_seed(0)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = task.loss(model, batch, gen, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.train_steps):
        step(i)
    sync(device)
    train_ips = args.batch * args.train_steps / (time.perf_counter() - t0)
    train_mem = peak_memory_gib(device)
    opt.state.clear()  # free the Adam moments before measuring sampling memory

    model.eval()
    pipe = task.pipeline(model)
    if amp is not None:
        pipe.to(device, amp)
    sample = {k: v[: args.sample_batch] for k, v in batch.items()}
    slots = slots_from_image(sample["image"], sample["crop_boxes"], sample["crop_labels"], sample["crop_valid"], ldm_s.max_crops)
    out = {"size": size, "train_ips": train_ips, "train_mem": train_mem}
    for name, sampler, steps in (("dpmpp25", "dpmpp", 25), ("ddpm1000", "ddpm", ldm_s.num_train_timesteps)):
        pipe.use_sampler(sampler)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pipe(sample["map"], slots, num_inference_steps=2, guidance_scale=args.guidance)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        pipe(sample["map"], slots, num_inference_steps=steps, guidance_scale=args.guidance,
             generator=torch.Generator(device=device).manual_seed(0))
        sync(device)
        out[f"{name}_ips"] = args.sample_batch / (time.perf_counter() - t0)
        out[f"{name}_mem"] = peak_memory_gib(device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    parser.add_argument("--preset", choices=PRESETS, help="model size (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes in px (default: 256 512 on CUDA, 32 64 on CPU)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (images per step)")
    parser.add_argument("--sample-batch", type=int, default=4, help="images sampled together")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (2 forward passes per step)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.preset = args.preset or ("base" if device.type == "cuda" else "tiny")
    sizes = args.sizes or ([256, 512] if device.type == "cuda" else [32, 64])
    torch.set_num_threads(args.threads)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"device: {device} ({what}); preset {args.preset}; torch {torch.__version__}; "
          f"train batch {args.batch}, sample batch {args.sample_batch}, guidance {args.guidance}; "
          f"precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    print("| size px | train img/s | train peak GiB | DPM++ 25 img/s | DDPM 1000 img/s | sampling peak GiB |")
    print("|--------:|------------:|---------------:|---------------:|----------------:|------------------:|")
    for size in sizes:
        r = bench_size(args, size, device)
        print(f"| {size} | {r['train_ips']:.2f} | {r['train_mem']:.2f} | {r['dpmpp25_ips']:.3f} | "
              f"{r['ddpm1000_ips']:.4f} | {max(r['dpmpp25_mem'], r['ddpm1000_mem']):.2f} |", flush=True)


if __name__ == "__main__":
    main()
