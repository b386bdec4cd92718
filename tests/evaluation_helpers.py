"""Small stores for the evaluation tests: a training-patch store (contract #4, the arrays
evaluation reads) and a synthetic store, with an easy two-tissue segmentation task."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import zarr

REPO = Path(__file__).resolve().parent.parent

# Tissue colours of the toy task (label 1 pink, label 2 purple); background (0) near white.
COLOURS = {0: (240, 240, 240), 1: (225, 140, 190), 2: (90, 40, 150)}


def toy_patches(n: int, size: int, rng: np.random.Generator, colours=COLOURS):
    """Images uint8 (n, size, size, 3) and maps uint16 (n, size, size): a random rectangle of
    label 2 on label 1, a background strip of label 0 on one side, plus colour noise."""
    images = np.zeros((n, size, size, 3), np.uint8)
    maps = np.ones((n, size, size), np.uint16)
    for i in range(n):
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 4, size // 2, 2)
        maps[i, y0 : y0 + h, x0 : x0 + w] = 2
        maps[i, :, : rng.integers(0, size // 6)] = 0
        rgb = np.array([colours[k] for k in range(3)], np.float32)[maps[i]]
        rgb += rng.normal(0, 12, rgb.shape)
        images[i] = np.clip(rgb, 0, 255).astype(np.uint8)
    return images, maps


def write_patch_store(path: Path, images: np.ndarray, maps: np.ndarray, split: np.ndarray,
                      num_labels: int = 3) -> Path:
    """A patch store written by the dataset stage's own writer (contract #4), no crops."""
    from histopipe.dataset import PatchStoreWriter

    n, s = images.shape[:2]
    writer = PatchStoreWriter(zarr.open_group(str(path), mode="w"), n, s, max_crops=1)
    for i in range(n):
        writer.add(images[i], maps[i].astype(np.uint16), np.zeros((1, 3), np.int32),
                   np.zeros(1, np.uint16), np.zeros(1, bool), (0, 64 * i), f"slide{i % 4}",
                   int(split[i]))
    names = ["background", "stroma", "tumour"][:num_labels]
    writer.finish(np.arange(num_labels, dtype=np.int32)[None],
                  {"patch_size": s, "num_labels": num_labels, "label_names": names})
    return path


def write_synthetic_store(path: Path, images: np.ndarray, maps: np.ndarray, variant: str,
                          source_index: np.ndarray | None = None) -> Path:
    group = zarr.open_group(str(path), mode="w")
    n, s = images.shape[:2]
    group.create_array("images", data=images, chunks=(1, s, s, 3))
    group.create_array("maps", data=maps.astype(np.uint16), chunks=(1, s, s))
    if source_index is not None:
        group.create_array("source_index", data=np.asarray(source_index, np.int64))
    group.attrs.update({"variant": variant, "seed": 0, "guidance": 1.0})
    return path


class TimmAdapter:
    """Stand-in for a registry encoder: a randomly initialised timm model, fixed seed."""

    def __init__(self, arch: str = "test_resnet", seed: int = 0, size: int = 64):
        import timm

        torch.manual_seed(seed)
        self.model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
        self.dim = self.model.num_features
        self.size = size
        self.weights_sha256 = f"random-{arch}-{seed}"

    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear")
        with torch.inference_mode():
            return self.model(x).float()


def tiny_factory(name: str, weights=None, device: str = "cpu") -> TimmAdapter:
    """Two encoders of different dimensions: tiny_a (96-dim), tiny_b (64-dim)."""
    return TimmAdapter("test_resnet" if name == "tiny_a" else "test_convnext", seed=0)


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: the test machine is shared, and oversubscribed threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # One thread: the test machine is shared, and oversubscribed threads crawl.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "histopipe", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"histopipe {args[0]} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
