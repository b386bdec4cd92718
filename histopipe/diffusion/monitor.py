"""Progress of a diffusion run that a user can read: FD and label fidelity of EMA samples.

Every ``eval_every`` optimizer steps the training loop samples the same held-out maps and
crops with the same seeds, so the curve moves only with the model. The samples are scored by
their Fréchet distance to the held-out patches themselves in a registry encoder (with a few
dozen samples the value is biased upwards, but its trend is what tells a run that learns from
one that does not) and, given the real-arm segmenter, by label fidelity: the segmenter's
prediction on each sample against the map it was drawn for. Given other held-out patches, the
same FD between them and the reference patches (``fd_real``, once per run) is the level real
tissue reaches at this number of samples: the floor that the samples' FD falls towards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histopipe.errors import HistopipeError
from histopipe.evaluation.frechet import frechet_distance_stats, gaussian_stats


class SampleMonitor:
    """Scores uint8 samples (N, H, W, 3) drawn for fixed held-out maps against the held-out
    patches ``real`` uint8 (N, H, W, 3); the encoder and segmenter are built on first use."""

    def __init__(self, real: np.ndarray, encoder: str, segmenter: str | Path | None = None,
                 other_real: np.ndarray | None = None):
        self.real = real
        self.other_real = other_real
        self.encoder_name = encoder
        self.segmenter_path = segmenter
        self._encoder = self._segmenter = self._real_stats = None
        self._fd_real: float | None = None
        if segmenter is not None and not Path(segmenter).is_file():  # fail now, not at the first evaluation
            raise HistopipeError(f"{segmenter}: segmenter file not found (written by evaluate-segmentation --mode real --model-out)")

    def _setup(self, device: torch.device) -> None:
        if self._encoder is not None:
            return
        from histopipe.encoders import get_encoder

        self._encoder = get_encoder(self.encoder_name, device=str(device))
        if len(self.real) >= 2:
            self._real_stats = gaussian_stats(self._encoder.embed(self.real).numpy().astype(np.float64))
            if self.other_real is not None and len(self.other_real) >= 2:
                other = gaussian_stats(self._encoder.embed(self.other_real).numpy().astype(np.float64))
                self._fd_real = frechet_distance_stats(self._real_stats, other)
        if self.segmenter_path is not None:
            from histopipe.evaluation.segmentation import load_segmenter

            self._segmenter = load_segmenter(self.segmenter_path, device)

    def __call__(self, samples: np.ndarray, maps: np.ndarray | None, device: torch.device) -> dict[str, float]:
        """``fd`` (and ``fd_real``, given other real patches); with a segmenter and maps at the
        finest level also ``label_miou`` and ``label_accuracy``."""
        self._setup(device)
        out = {}
        if min(len(samples), len(self.real)) >= 2:  # a covariance needs two
            feats = self._encoder.embed(samples).numpy().astype(np.float64)
            out["fd"] = frechet_distance_stats(self._real_stats, gaussian_stats(feats))
            if self._fd_real is not None:
                out["fd_real"] = self._fd_real
        if self._segmenter is not None and maps is not None:
            from histopipe.evaluation.fidelity import label_fidelity

            scores = label_fidelity(self._segmenter, samples, maps, device)
            out["label_miou"] = scores["miou"]
            out["label_accuracy"] = scores["pixel_accuracy"]
        return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}
