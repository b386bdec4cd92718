"""Evaluation of synthetic data: Fréchet distance and k-NN precision/recall in several
encoders (``distribution``), DeepLabv3+ downstream segmentation (``segmentation``), the
ablation table (``ablation``) and its figures (``figures``); settings in ``settings``."""

from histopipe.evaluation.frechet import (
    GaussianStats,
    RunningStats,
    frechet_distance,
    frechet_distance_stats,
    gaussian_stats,
)
from histopipe.evaluation.manifold import ManifoldMetrics, prdc

__all__ = [
    "GaussianStats",
    "ManifoldMetrics",
    "RunningStats",
    "frechet_distance",
    "frechet_distance_stats",
    "gaussian_stats",
    "prdc",
]
