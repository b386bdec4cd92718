"""Embedding throughput: end to end (tiles read from a real slide by worker processes,
resized, normalised, embedded, written) against the model alone on random tensors of the
same batch shape. Prints a Markdown table.

    python benchmarks/embedding.py [--threads 2] [--tiles 88] [--out results.md]

Encoders: efficientnet_lite0 (real weights), ViT-S/16 and ViT-L/16 (UNI's architecture)
with random weights (speed does not depend on the weight values).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from histopipe.demo import fetch_cmu_slide  # noqa: E402
from histopipe.embedding import EmbeddingConfig, embed_tiles  # noqa: E402
from histopipe.encoders import get_encoder  # noqa: E402
from histopipe.tiling import TileStore, TilingConfig, tile_slide, write_tile_store  # noqa: E402

# (encoder, pretrained, batch sizes, worker counts, max tiles)
CASES = (
    ("efficientnet_lite0", True, (16, 64), (0, 2), None),
    ("timm:vit_small_patch16_224", False, (16, 64), (0, 2), None),
    ("uni", False, (16,), (2,), 32),
)


def model_only(encoder, batch: int, repeats: int) -> float:
    """Images/s of normalise + forward on random uint8 batches already in memory."""
    x = torch.randint(0, 256, (batch, 3, encoder.spec.input_size, encoder.spec.input_size), dtype=torch.uint8)
    with torch.inference_mode():
        encoder(encoder.normalize(x).contiguous(memory_format=torch.channels_last))  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            encoder(encoder.normalize(x).contiguous(memory_format=torch.channels_last))
    return batch * repeats / (time.perf_counter() - t0)


def subset(store: Path, n: int | None, folder: Path) -> Path:
    if n is None:
        return store
    src = TileStore(store)
    out = folder / f"tiles_{n}.zarr"
    attrs = dict(src.attrs, n_tiles=min(n, len(src)))
    write_tile_store(out, src.coords[:n], src.tissue_fraction[:n], attrs)
    return out


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except StopIteration:
        cpu = platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, no GPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the main process")
    ap.add_argument("--tiles", type=int, default=None, help="at most this many tiles per run (default: all 88 of the slide)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"Machine: {machine()}; load average at start {os.getloadavg()[0]:.1f}.", "",
             "| encoder | params (M) | batch | workers | tiles | end to end (tiles/s) | model only (images/s) | end to end / model |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Every grid tile of the real slide (background included): 88 tiles of 256 px at 0.5 µm/px.
        store = folder / "cmu.zarr"
        tile_slide(fetch_cmu_slide(), store, "cmu", TilingConfig(min_tissue=0.0))
        for name, pretrained, batches, workers, max_tiles in CASES:
            torch.manual_seed(0)
            encoder = get_encoder(name, pretrained=pretrained)
            params = sum(p.numel() for p in encoder.parameters()) / 1e6
            tiles = subset(store, max_tiles if args.tiles is None else min(args.tiles, max_tiles or args.tiles), folder)
            n = len(TileStore(tiles))
            for batch in batches:
                reference = model_only(encoder, batch, repeats=max(1, min(3, n // batch)))
                for w in workers:
                    cfg = EmbeddingConfig(batch_size=batch, num_workers=w)
                    r = embed_tiles(tiles, folder / f"{name.replace(':', '-')}_{batch}_{w}.zarr", cfg, encoder=encoder, force=True, progress=False)
                    rate = r.n_tiles / r.seconds
                    row = f"| {name} | {params:.1f} | {batch} | {w} | {n} | {rate:.1f} | {reference:.1f} | {rate / reference:.2f} |"
                    print(row, flush=True)
                    lines.append(row)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
