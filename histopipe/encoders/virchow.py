"""Virchow2 (Paige): DINOv2-trained ViT-H/14 on 3.1M slides, mixed magnifications.

Per the model card (paige-ai/Virchow2): ``vit_huge_patch14_224`` with SwiGLU MLP (ratio
5.3375), SiLU, 4 register tokens, layer scale 1e-5; the tile embedding is the class token
concatenated with the mean of the 256 patch tokens (register tokens excluded): 2 × 1280 =
2560. 224 px input, ImageNet mean/std; the card recommends fp16 autocast on GPU.
"""

from __future__ import annotations

from histopipe.encoders.registry import register


@register(
    "virchow2",
    architecture="vit_huge_patch14_224",
    dim=2560,
    input_size=224,
    pooling="cls+mean",
    dtype="float16",
    hub_id="paige-ai/Virchow2",
    weights_files=("model.safetensors", "pytorch_model.bin"),
    weights_note="gated: log in, accept the licence (CC-BY-NC-ND 4.0) on the model page",
    params_m=631.2,
    description="Virchow2 ViT-H/14, class token + mean patch token",
)
def virchow2() -> dict:
    import torch
    from timm.layers import SwiGLUPacked

    return dict(
        img_size=224,
        init_values=1e-5,
        mlp_ratio=5.3375,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=4,
        global_pool="",
        dynamic_img_size=True,
    )
