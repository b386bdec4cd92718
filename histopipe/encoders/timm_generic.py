"""``timm:<architecture>``: any timm model with a local weights file.

The spec is read from timm itself: input size, mean and std from the architecture's default
pretrained config, the embedding dim from the model's ``num_features`` (built on the meta
device, so no memory is spent). Weights: ``--weights``/``embedding.weights``, else
``$HISTOPIPE_WEIGHTS_DIR/timm/<architecture>/model.safetensors``, else with ``online`` the
timm hub repository of the architecture's default tag.
"""

from __future__ import annotations

import difflib
from functools import lru_cache

import torch

from histopipe.encoders.registry import TIMM_PREFIX, EncoderSpec
from histopipe.errors import ConfigError


@lru_cache(maxsize=64)
def timm_spec(architecture: str) -> EncoderSpec:
    """Spec of the timm ``architecture`` with its default normalisation and input size."""
    import timm

    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"encoder {TIMM_PREFIX}{architecture}: no such timm architecture{hint}")
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg
    input_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    hub = cfg.get("hf_hub_id") or None
    return EncoderSpec(
        name=f"{TIMM_PREFIX}{architecture}",
        architecture=architecture,
        dim=int(model.num_features),
        input_size=input_size,
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        hub_id=hub,
        weights_files=("model.safetensors", "pytorch_model.bin"),
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        description=f"timm {architecture} (any timm model with local weights)",
    )
