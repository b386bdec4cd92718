"""UNI and UNI2-h (Mahmood Lab): DINOv2-trained ViTs on 100k+ H&E slides (ViT-L/16, ViT-H/14).

Kwargs as published on the model cards (MahmoodLab/UNI, MahmoodLab/UNI2-h) for local
checkpoints; embedding = class token after the final norm. 224 px input, ImageNet mean/std.
"""

from __future__ import annotations

from histopipe.encoders.registry import register

GATED = "gated: log in, accept the licence on the model page"


@register(
    "uni",
    architecture="vit_large_patch16_224",
    dim=1024,
    input_size=224,
    hub_id="MahmoodLab/UNI",
    weights_files=("pytorch_model.bin",),
    weights_note=GATED,
    params_m=303.4,
    description="UNI ViT-L/16, class token",
)
def uni() -> dict:
    return dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True)


@register(
    "uni2-h",
    architecture="vit_giant_patch14_224",
    dim=1536,
    input_size=224,
    hub_id="MahmoodLab/UNI2-h",
    weights_files=("pytorch_model.bin",),
    weights_note=GATED,
    params_m=681.4,
    description="UNI2-h ViT-H/14 (SwiGLU, 8 register tokens), class token",
)
def uni2_h() -> dict:
    import torch
    from timm.layers import SwiGLUPacked

    return dict(
        img_size=224,
        patch_size=14,
        depth=24,
        num_heads=24,
        init_values=1e-5,
        embed_dim=1536,
        mlp_ratio=2.66667 * 2,
        no_embed_class=True,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=8,
        dynamic_img_size=True,
    )
