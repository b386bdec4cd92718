"""H-optimus-0 and H-optimus-1 (Bioptimus): DINOv2-trained ViT-g/14 with 4 register tokens.

Architecture as in timm's ``vit_giant_patch14_reg4_dinov2`` (SwiGLU, layer scale) at 224 px;
embedding = class token, 1536-dim. Inputs are tiles at 0.5 µm/px normalised with the
published H&E statistics; the release recommends fp16 autocast on GPU.
"""

from __future__ import annotations

from histopipe.encoders.registry import register

SHARED = dict(
    architecture="vit_giant_patch14_reg4_dinov2",
    dim=1536,
    input_size=224,
    mean=(0.707223, 0.578729, 0.703617),
    std=(0.211883, 0.230117, 0.177517),
    dtype="float16",
    weights_files=("model.safetensors", "pytorch_model.bin"),
    params_m=1134.8,
)


def _kwargs() -> dict:
    return dict(img_size=224, init_values=1e-5, global_pool="token", dynamic_img_size=True)


@register(
    "h-optimus-0",
    hub_id="bioptimus/H-optimus-0",
    weights_note="gated: accept the licence (Apache-2.0) on the model page",
    description="H-optimus-0 ViT-g/14 (4 registers), class token",
    **SHARED,
)
def h_optimus_0() -> dict:
    return _kwargs()


@register(
    "h-optimus-1",
    hub_id="bioptimus/H-optimus-1",
    weights_note="gated: accept the licence (non-commercial) on the model page",
    description="H-optimus-1 ViT-g/14 (4 registers), class token",
    **SHARED,
)
def h_optimus_1() -> dict:
    return _kwargs()
