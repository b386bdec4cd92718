"""Patch encoders: a registry of timm models with their input size, normalisation and weights.

``get_encoder(name, weights=None, device="cpu")`` → ``Encoder`` (``.spec``, ``.dim``,
``.weights_sha256``, ``.embed(uint8 (B, H, W, 3)) → float32 (B, D)``); ``list_encoders()``.
Families, one module each: ``efficientnet`` (offline default, ImageNet), ``uni`` (UNI,
UNI2-h), ``virchow`` (Virchow2), ``hoptimus`` (H-optimus-0/1), ``gigapath`` (Prov-GigaPath),
``timm_generic`` (``timm:<architecture>``).

Phikon-v2 (owkin/phikon-v2) is not registered: it is published only as a Hugging Face
``transformers`` Dinov2Model checkpoint (transformers key names, separate q/k/v
projections), so timm cannot load it as it is; it would need transformers (not a dependency)
or an untested key conversion. Phikon v1 is in the same situation.
"""

from histopipe.encoders import efficientnet, gigapath, hoptimus, uni, virchow  # noqa: F401  (registers)
from histopipe.encoders.registry import (
    Encoder,
    EncoderSpec,
    ResolvedWeights,
    TileTransform,
    autocast_dtype,
    get_encoder,
    get_spec,
    list_encoders,
    register,
    resolve_device,
    resolve_weights,
    sha256_file,
)

__all__ = [
    "Encoder",
    "EncoderSpec",
    "ResolvedWeights",
    "TileTransform",
    "autocast_dtype",
    "get_encoder",
    "get_spec",
    "list_encoders",
    "register",
    "resolve_device",
    "resolve_weights",
    "sha256_file",
]
