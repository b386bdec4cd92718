"""Distribution metrics of a synthetic set against held-out real patches, per encoder.

For each encoder: Fréchet distance from streamed float64 feature statistics of all sampled
images, and precision / recall / density / coverage on a seeded random subset of them, with
k-NN radii that skip overlapping patches (``knn_independent``; ``manifold`` module) and, for
comparison, the plain estimator's values (``plain``). The result is one JSON-ready dict that
records the sample counts, encoders and seeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from histopipe import __version__
from histopipe.evaluation.features import (
    FeatureEncoder,
    ImageSet,
    embed_set,
    kept_positions,
    patch_footprints,
    synthetic_footprints,
)
from histopipe.evaluation.frechet import frechet_distance_stats
from histopipe.evaluation.manifold import prdc
from histopipe.evaluation.settings import EvaluationSettings, resolve_device

log = logging.getLogger(__name__)

EncoderFactory = Callable[..., FeatureEncoder]

# Columns of the per-encoder TSV, in order.
TSV_COLUMNS = (
    "variant", "encoder", "dim", "n_real", "n_synthetic", "n_manifold_real",
    "n_manifold_synthetic", "fd", "precision", "recall", "density", "coverage", "knn_k", "seed",
)


def registry_factory(name: str, weights: str | None = None, device: str = "cpu") -> FeatureEncoder:
    """``histopipe.encoders.get_encoder``, imported when first needed."""
    from histopipe.encoders import get_encoder

    return get_encoder(name, weights=weights, device=device)


def evaluate_distribution(
    real: ImageSet,
    synthetic: ImageSet,
    settings: EvaluationSettings,
    variant: str | None = None,
    encoder_factory: EncoderFactory = registry_factory,
) -> dict:
    """FD and k-NN manifold metrics of ``synthetic`` against ``real`` in every encoder of
    ``settings.encoders``; the returned dict is what ``evaluate-distribution`` writes as JSON."""
    device = resolve_device(settings.device)
    variant = variant or str(synthetic.attrs.get("variant", synthetic.path.stem))
    results: dict[str, dict] = {}
    keep = settings.manifold_samples
    real_pos = kept_positions(len(real), keep, settings.seed)
    syn_pos = kept_positions(len(synthetic), keep, settings.seed + 1)
    real_fp = syn_fp = None
    independence = {"enabled": settings.knn_independent}
    if settings.knn_independent:
        real_fp, why_real = patch_footprints(real.path, real.indices[real_pos])
        syn_fp, why_syn = synthetic_footprints(synthetic, syn_pos)
        independence.update(real=real_fp is not None, synthetic=syn_fp is not None,
                            **{k: v for k, v in (("real_reason", why_real), ("synthetic_reason", why_syn)) if v})
    for name in settings.encoders:
        t0 = time.perf_counter()
        encoder = encoder_factory(
            name, weights=settings.encoder_weights.get(name), device=str(device)
        )
        real_stats, real_feats = embed_set(encoder, real, settings.batch_size, keep, settings.seed)
        syn_stats, syn_feats = embed_set(
            encoder, synthetic, settings.batch_size, keep, settings.seed + 1
        )
        reasons: dict[str, str] = {}
        fd = None
        if min(real_stats.n, syn_stats.n) < 2:
            reasons["fd"] = f"a covariance needs 2 images per set; {real_stats.n} real, {syn_stats.n} synthetic"
        else:
            fd = frechet_distance_stats(real_stats.stats(), syn_stats.stats())
        k = settings.knn_k
        manifold = {m: None for m in ("precision", "recall", "density", "coverage")}
        plain: dict | None = None
        if min(len(real_feats), len(syn_feats)) <= k:
            why = f"k-NN radii with k={k} need more than {k} images per set; {len(real_feats)} real, {len(syn_feats)} synthetic"
            reasons.update({m: why for m in manifold})
        else:
            manifold = prdc(real_feats, syn_feats, k=k, device=device, real_footprints=real_fp,
                            synthetic_footprints=syn_fp).to_dict()
            if real_fp is not None or syn_fp is not None:
                plain = prdc(real_feats, syn_feats, k=k, device=device).to_dict()
        results[name] = {
            "dim": int(encoder.dim),
            "weights_sha256": getattr(encoder, "weights_sha256", None),
            "weights": settings.encoder_weights.get(name),
            "n_real": real_stats.n,
            "n_synthetic": syn_stats.n,
            "n_manifold_real": len(real_feats),
            "n_manifold_synthetic": len(syn_feats),
            "fd": fd,
            **{m: manifold[m] for m in ("precision", "recall", "density", "coverage")},
            "radius_fallback": {"real": manifold.get("radius_fallback_real", 0),
                                "synthetic": manifold.get("radius_fallback_synthetic", 0)},
            "plain": None if plain is None else {m: plain[m] for m in ("precision", "recall", "density", "coverage")},
            "reasons": reasons,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log.info("%s: %s FD %s precision %s recall %s", variant, name, fd, manifold["precision"], manifold["recall"])
        del encoder
    return {
        "kind": "distribution",
        "variant": variant,
        "real": real.describe(),
        "synthetic": synthetic.describe(),
        "seed": settings.seed,
        "knn_k": settings.knn_k,
        "knn_independent": independence,
        "max_samples": settings.max_samples,
        "manifold_samples": settings.manifold_samples,
        "device": str(device),
        "encoders": results,
        "histopipe_version": __version__,
    }


def distribution_rows(result: dict) -> list[dict]:
    """One flat row per encoder (the TSV form of an ``evaluate_distribution`` result)."""
    rows = []
    for name, enc in result["encoders"].items():
        row = {"variant": result["variant"], "encoder": name, "knn_k": result["knn_k"],
               "seed": result["seed"]}
        row.update({k: enc[k] for k in TSV_COLUMNS if k in enc})
        rows.append({k: row[k] for k in TSV_COLUMNS})
    return rows
