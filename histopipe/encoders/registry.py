"""The patch-encoder registry: specs, weight files, and the Encoder module built from them.

Each model family registers its encoders in its own small module with ``@register``: the
decorated function returns the keyword arguments for ``timm.create_model`` (built lazily,
so that registering costs no import of timm layers). ``get_encoder(name)`` resolves the
weights file, builds the model with timm, loads the weights strictly and wraps it in an
``Encoder`` that carries its spec, its transform and the sha256 of its weights.

Weights come from a local file: the ``weights`` argument (config ``embedding.weights``,
CLI ``--weights``), else ``$HISTOPIPE_WEIGHTS_DIR/<name>/<file>`` (default
``~/.cache/histopipe/weights``), else a family-specific place (an installed package). Only
when ``online=True`` is the file fetched from the model's Hugging Face repository. timm is
always handed the file itself (``pretrained_cfg_overlay``), never a hub name, so loading
never touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histopipe.errors import ConfigError, HistopipeError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("model", "cls+mean")
WEIGHTS_DIR_ENV = "HISTOPIPE_WEIGHTS_DIR"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build, feed and describe one patch encoder.

    ``input_size`` is the square side (px) the model sees; tiles are resized to
    ``input_size / crop_pct`` and centre-cropped to ``input_size``. ``mean``/``std`` are per
    RGB channel on the 0–1 scale. ``pooling`` is ``model`` (timm's pooled output with
    ``num_classes=0``: the class token for ViTs, global average for CNNs) or ``cls+mean``
    (class token concatenated with the mean of the patch tokens, register tokens excluded).
    ``dtype`` is the autocast dtype on GPU. ``hub_id`` is the Hugging Face repository the
    weights are published in and ``weights_files`` the accepted file names there.
    """

    name: str
    architecture: str
    dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: str = "model"
    crop_pct: float = 1.0
    dtype: str = "bfloat16"
    hub_id: str | None = None
    weights_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    weights_note: str = ""
    params_m: float | None = None
    description: str = ""
    build_kwargs: Callable[[], dict[str, Any]] = field(default=dict, repr=False, compare=False)
    # Converts a checkpoint with foreign key names into timm's state dict (None: timm reads it).
    convert_checkpoint: Callable[[Path], dict[str, torch.Tensor]] | None = field(default=None, repr=False, compare=False)
    # Where weights are found when none is given and the weights folder has none.
    default_weights: Callable[[], Path | None] | None = field(default=None, repr=False, compare=False)

    @property
    def weights_source(self) -> str:
        """Where the weights come from, in words (for listings and store attributes)."""
        if self.hub_id:
            return f"hf-hub:{self.hub_id} ({' or '.join(self.weights_files)})"
        return self.weights_note or "local file"

    def timm_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.build_kwargs())
        kwargs.setdefault("num_classes", 0)
        return kwargs


_REGISTRY: dict[str, EncoderSpec] = {}


def register(name: str, **fields: Any) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    """Decorator: register an encoder whose timm keyword arguments the function returns.

    ``fields`` are the other ``EncoderSpec`` fields (``architecture``, ``dim``, ``input_size``,
    normalisation, weights source...).
    """

    def decorate(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        spec = EncoderSpec(name=name, build_kwargs=fn, **fields)
        if spec.pooling not in POOLINGS:
            raise ValueError(f"encoder {name!r}: pooling must be one of {POOLINGS}")
        _REGISTRY[name] = spec
        return fn

    return decorate


def unregister(name: str) -> None:
    """Remove an encoder (tests register throw-away specs)."""
    _REGISTRY.pop(name, None)


def list_encoders() -> list[str]:
    """Registered encoder names, sorted. ``timm:<architecture>`` names work too."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    """The spec of a registered encoder or of ``timm:<architecture>``."""
    if name.startswith(TIMM_PREFIX):
        from histopipe.encoders.timm_generic import timm_spec

        return timm_spec(name[len(TIMM_PREFIX) :])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown encoder {name!r}; registered: {', '.join(list_encoders())}, or timm:<architecture>") from None


# --- weights -----------------------------------------------------------------------------


def weights_dir() -> Path:
    """Folder searched for weights: ``$HISTOPIPE_WEIGHTS_DIR`` or ``~/.cache/histopipe/weights``."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or "~/.cache/histopipe/weights").expanduser()


def default_weights_paths(spec: EncoderSpec) -> list[Path]:
    folder = weights_dir() / spec.name.replace(":", "/")
    return [folder / f for f in spec.weights_files]


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file and its checksum; ``path`` None means random initialisation."""

    path: Path | None
    sha256: str
    source: str  # "file", "weights-dir", "package", "hub" or "random"


RANDOM_INIT = ResolvedWeights(None, "random-init", "random")

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (cached per process by path, size and mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 23):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def missing_weights_message(spec: EncoderSpec, given: Path | None = None) -> str:
    """Say which file to download, from where, and where to put it."""
    where = f"weights file not found: {given}" if given else "no weights file found"
    files = " or ".join(repr(f) for f in spec.weights_files)
    if spec.hub_id:
        get = f"Download {files} from the Hugging Face repository {spec.hub_id} (https://huggingface.co/{spec.hub_id})"
        if spec.weights_note:
            get += f"; {spec.weights_note}"
    else:
        get = spec.weights_note or f"Get a checkpoint ({files}) for the timm architecture {spec.architecture!r}"
    put = " or ".join(str(p) for p in default_weights_paths(spec))
    msg = (
        f"encoder {spec.name!r}: {where}. {get}. Then put it at {put} (the folder is "
        f"${WEIGHTS_DIR_ENV}, default ~/.cache/histopipe/weights), or pass its path with "
        f"--weights / config key embedding.weights"
    )
    if spec.hub_id:
        msg += "; on a machine with network access, embedding.online: true (--online) downloads it"
    return msg + "."


def resolve_weights(spec: EncoderSpec, weights: str | Path | None = None, online: bool = False) -> ResolvedWeights:
    """Find the weights file of ``spec`` and checksum it; raise WeightsError if there is none."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(missing_weights_message(spec, path))
        return ResolvedWeights(path, sha256_file(path), "file")
    for path in default_weights_paths(spec):
        if path.is_file():
            return ResolvedWeights(path, sha256_file(path), "weights-dir")
    if spec.default_weights is not None:
        path = spec.default_weights()
        if path is not None and path.is_file():
            return ResolvedWeights(path, sha256_file(path), "package")
    if online and spec.hub_id:
        path = _download(spec)
        return ResolvedWeights(path, sha256_file(path), "hub")
    raise WeightsError(missing_weights_message(spec))


def _download(spec: EncoderSpec) -> Path:
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in spec.weights_files:
        try:
            return Path(hf_hub_download(spec.hub_id, filename))
        except Exception as err:  # not found, gated, no network: try the next name
            errors.append(f"{filename}: {type(err).__name__}: {err}")
    raise WeightsError(f"encoder {spec.name!r}: cannot download weights from {spec.hub_id}: " + "; ".join(errors))


# --- building ----------------------------------------------------------------------------


def build_model(spec: EncoderSpec, weights: ResolvedWeights = RANDOM_INIT) -> nn.Module:
    """The timm model of ``spec`` (classifier removed) with ``weights`` loaded strictly.

    The checkpoint goes through timm's own loader (``pretrained_cfg_overlay``), so timm's
    per-architecture checkpoint filter applies (e.g. original DINOv2 key names, position
    embedding resizing). timm loads non-strictly whenever the model's class count differs
    from its pretrained config's, which a headless model always does; declaring the
    checkpoint headless (``num_classes=0``, classifier tensors dropped) keeps the load
    strict, so a checkpoint of another model fails instead of leaving layers random.
    """
    import timm

    kwargs = spec.timm_kwargs()
    if weights.path is None:
        return timm.create_model(spec.architecture, pretrained=False, **kwargs)
    try:
        if spec.convert_checkpoint is not None:
            state = spec.convert_checkpoint(weights.path)
        else:
            state = timm.models.load_state_dict(str(weights.path))
        if kwargs["num_classes"] == 0:
            state = _drop_classifier(state, spec.architecture)
        overlay = {"state_dict": state, "num_classes": kwargs["num_classes"]}
        return timm.create_model(spec.architecture, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except WeightsError:
        raise
    except Exception as err:  # torch/safetensors/timm raise many types for a bad file
        text = str(err).strip()
        first = text.splitlines()[0][:400] if text else type(err).__name__
        raise WeightsError(
            f"{weights.path}: cannot load as weights of encoder {spec.name!r} "
            f"(timm {spec.architecture}): {first}"
        ) from None


def _drop_classifier(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    import timm

    names = timm.models.get_pretrained_cfg_value(architecture, "classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    drop = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    return {k: v for k, v in state.items() if k not in drop}


class TileTransform:
    """uint8 ``(H, W, 3)`` RGB tile → uint8 ``(3, S, S)`` tensor at the encoder's input size.

    Resizes to ``S / crop_pct`` (area interpolation when shrinking, which antialiases;
    bicubic when enlarging) and centre-crops ``S``. Normalisation happens later, on the
    device, so that workers hand over 1 byte per value instead of 4. Picklable.
    """

    def __init__(self, input_size: int, crop_pct: float = 1.0):
        self.input_size = int(input_size)
        self.resize_to = int(round(self.input_size / float(crop_pct)))

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        import cv2

        tile = np.asarray(tile)
        if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB tile, got {tile.dtype} {tile.shape}")
        r = self.resize_to
        if tile.shape[:2] != (r, r):
            shrink = tile.shape[0] * tile.shape[1] >= r * r
            tile = cv2.resize(tile, (r, r), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        if r != self.input_size:
            o = (r - self.input_size) // 2
            tile = tile[o : o + self.input_size, o : o + self.input_size]
        return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))


class Encoder(nn.Module):
    """A patch encoder: timm model + its spec, transform, normalisation and weights checksum.

    ``forward`` takes normalised float ``(B, 3, S, S)`` and returns ``(B, dim)``;
    ``normalize`` turns uint8 ``(B, 3, S, S)`` into that input; ``embed`` does everything
    from uint8 ``(B, H, W, 3)`` images.
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, weights: ResolvedWeights = RANDOM_INIT):
        super().__init__()
        self.spec = spec
        self.model = model.eval()
        self.weights_path = weights.path
        self.weights_sha256 = weights.sha256
        self.weights_origin = weights.source
        self.transform = TileTransform(spec.input_size, spec.crop_pct)
        # Normalisation on the 0-255 scale: one fused multiply-add from uint8.
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean255", mean, persistent=False)
        self.register_buffer("std255", std, persistent=False)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def device(self) -> torch.device:
        return self.mean255.device

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` → float32 normalised, on this encoder's device."""
        x = x.to(self.device, non_blocking=True).float()
        return (x - self.mean255) / self.std255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "cls+mean":
            tokens = self.model.forward_features(x)
            patches = tokens[:, self.model.num_prefix_tokens :]
            return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
        return self.model(x)

    def _inputs(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor | None:
        """uint8 RGB images ``(B, H, W, 3)`` transformed and normalised on this encoder's
        device; None when there are none."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        batch = [self.transform(np.asarray(im)) for im in images]
        return self.normalize(torch.stack(batch)) if batch else None

    def embed(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray], precision: str = "auto") -> torch.Tensor:
        """Embed uint8 RGB images ``(B, H, W, 3)``: float32 ``(B, dim)`` on the CPU."""
        x = self._inputs(images)
        if x is None:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        amp = autocast_dtype(precision, self.device, self.spec)
        with torch.inference_mode(), autocast(self.device, amp):
            return self(x).float().cpu()

    def appearance(self, images: Sequence[np.ndarray], stages: int = 3, precision: str = "auto") -> torch.Tensor:
        """Colour and texture statistics of uint8 RGB images ``(B, H, W, 3)``: the per-channel
        mean and standard deviation of the activations of the model's first ``stages`` feature
        stages (the statistics style transfer matches), each stage's block scaled to unit length
        and the whole to unit length, so that every stage counts equally. float32 ``(B, D)``
        on the CPU. Pooled final features say *what* tissue a crop shows; these say how it
        looks (stain, texture at the scale of a few pixels)."""
        if not hasattr(self.model, "forward_intermediates"):
            raise HistopipeError(
                f"encoder {self.spec.name!r} ({self.spec.architecture}): timm gives no intermediate features for it, "
                "so it has no appearance statistics; choose another encoder or pooled features"
            )
        x = self._inputs(images)
        if x is None:
            return torch.zeros((0, 0), dtype=torch.float32)
        amp = autocast_dtype(precision, self.device, self.spec)
        with torch.inference_mode(), autocast(self.device, amp):
            maps = self.model.forward_intermediates(x, indices=list(range(stages)), intermediates_only=True)
        blocks = []
        for fmap in maps:
            fmap = fmap.float().flatten(2)  # (B, C, HW)
            stats = torch.cat([fmap.mean(2), fmap.std(2)], dim=1)
            blocks.append(nn.functional.normalize(stats, dim=1))
        return nn.functional.normalize(torch.cat(blocks, dim=1), dim=1).cpu()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_dtype(precision: str, device: torch.device | str, spec: EncoderSpec | None = None) -> torch.dtype | None:
    """Autocast dtype for ``precision`` (``auto``, ``bf16``, ``fp16``, ``fp32``); None = fp32.

    ``auto`` is the encoder's preferred dtype on CUDA (bf16 falls back to fp16 on GPUs
    without bf16) and fp32 on the CPU, where half precision is slower.
    """
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ConfigError(f"precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    if device.type != "cuda":
        return None
    want = torch.float16 if spec is not None and spec.dtype == "float16" else torch.bfloat16
    if want == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        want = torch.float16
    return want


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available (use auto or cpu)")
    return dev


def get_encoder(
    name: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    pretrained: bool = True,
    online: bool = False,
) -> Encoder:
    """Build encoder ``name`` (registered, or ``timm:<architecture>``) in eval mode on ``device``.

    ``weights``: a .safetensors/.pth file (else the weights folder, the family's default
    place, or with ``online`` the hub). ``pretrained=False`` gives random weights (tests,
    benchmarks). Raises WeightsError when no file is found or it does not fit the model.
    """
    spec = get_spec(name)
    resolved = resolve_weights(spec, weights, online) if pretrained else RANDOM_INIT
    model = build_model(spec, resolved)
    enc = Encoder(spec, model, resolved)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return enc.to(dev)
