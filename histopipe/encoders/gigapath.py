"""Prov-GigaPath tile encoder (Providence / Microsoft): DINOv2-trained ViT-g on 171k slides.

Per its published timm config: ``vit_giant_patch14_dinov2`` with ``patch_size=16`` (so
14 × 14 patches at 224 px), SwiGLU, layer scale 1e-5; embedding = class token, 1536-dim.
The published transform resizes to 256 px (bicubic) and centre-crops 224: crop_pct 0.875.
"""

from __future__ import annotations

from histopipe.encoders.registry import register


@register(
    "prov-gigapath",
    architecture="vit_giant_patch14_dinov2",
    dim=1536,
    input_size=224,
    crop_pct=224 / 256,
    hub_id="prov-gigapath/prov-gigapath",
    weights_files=("pytorch_model.bin",),
    weights_note="gated: log in, accept the licence on the model page",
    params_m=1135.0,
    description="Prov-GigaPath tile encoder ViT-g/16, class token",
)
def prov_gigapath() -> dict:
    return dict(
        img_size=224,
        in_chans=3,
        patch_size=16,
        embed_dim=1536,
        depth=40,
        num_heads=24,
        init_values=1e-5,
        mlp_ratio=5.33334,
        dynamic_img_size=True,
    )
