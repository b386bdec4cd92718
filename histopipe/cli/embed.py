"""``histopipe embed`` (one slide's tile store → embedding store) and ``histopipe encoders``."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from histopipe.config import json_overrides, load_config, section


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "embed", help="embed the tiles of one tile store with a patch encoder",
        description=(
            "Read every tile of TILES (a tile store) from its slide, resize it to the encoder's "
            "input size (px), normalise it and write the encoder's features to OUT (zarr v3: "
            "features (N, D), coords (N, 2) level-0 px, attributes incl. the weights' sha256). "
            "An existing OUT made from the same tiles with the same weights is kept unless --force."),
    )
    e.add_argument("tiles", type=Path, help="tile store (.zarr) written by `histopipe tile`")
    e.add_argument("out", type=Path, help="output embedding store (.zarr folder)")
    e.add_argument("--config", type=Path, default=None, help="config YAML; its `embedding` section is used (flags override it)")
    e.add_argument("--config-json", default=None, help="config sections as JSON, merged over --config (used by the workflow)")
    e.add_argument("--encoder", default=None, help="encoder name (see `histopipe encoders`) or timm:<architecture> (default efficientnet_lite0)")
    e.add_argument("--weights", default=None, help="weights file (.safetensors/.pth/.bin) of the encoder")
    e.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (default 64)")
    e.add_argument("--num-workers", type=int, default=None, help="tile-reading worker processes (default 2; 0 = main process)")
    e.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto)")
    e.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None, help="compute precision (default auto: half on GPU, fp32 on CPU)")
    e.add_argument("--dtype", choices=["float16", "float32"], default=None, help="storage type of the features (default float16)")
    e.add_argument("--online", action="store_true", default=None, help="allow downloading missing weights from the Hugging Face hub")
    e.add_argument("--force", action="store_true", help="recompute even when OUT already holds this result")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_embed)

    ls = sub.add_parser("encoders", help="list the registered patch encoders",
                        description="Registered encoders: name, timm architecture, embedding dim, input size (px), parameters (millions) and where the weights come from.")
    ls.set_defaults(func=run_encoders)


def embedding_config(args: argparse.Namespace):
    from histopipe.embedding import EmbeddingConfig

    cfg = section(load_config(args.config, json_overrides(args.config_json)), "embedding", EmbeddingConfig)
    flags = {"encoder": args.encoder, "weights": args.weights, "batch_size": args.batch_size,
             "num_workers": args.num_workers, "device": args.device, "precision": args.precision,
             "dtype": args.dtype, "online": args.online}
    return replace(cfg, **{k: v for k, v in flags.items() if v is not None})


def run_embed(args: argparse.Namespace) -> int:
    cfg = embedding_config(args)
    if not cfg.online:
        # Before timm/huggingface_hub are imported: no stray hub request can wait on the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from histopipe.embedding import embed_tiles

    r = embed_tiles(args.tiles, args.out, cfg, force=args.force, progress=not args.no_progress)
    if r.skipped:
        print(f"{r.slide_id}: {args.out} is up to date ({r.n_tiles} tiles, {cfg.encoder}): kept")
    else:
        print(f"{r.slide_id}: {r.n_tiles} tiles -> {r.dim}-dim {cfg.encoder} features, "
              f"{r.seconds:.1f} s ({r.tiles_per_s:.1f} tiles/s) -> {args.out}")
    return 0


def run_encoders(args: argparse.Namespace) -> int:
    from histopipe.encoders import get_spec, list_encoders

    rows = [("name", "architecture", "dim", "input", "params_M", "weights")]
    for name in list_encoders():
        s = get_spec(name)
        rows.append((s.name, s.architecture, str(s.dim), f"{s.input_size}px", f"{s.params_m:g}" if s.params_m else "?", s.weights_source))
    rows.append(("timm:<architecture>", "<architecture>", "model's", "model's", "", "local file (--weights)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return 0
