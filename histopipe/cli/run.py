"""``histopipe install-profile`` (Snakemake profiles by name)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install-profile", help="make `snakemake --profile slurm` work: link the profile into Snakemake's profile folder",
                       description="Link profiles/NAME of this repository as NAME in the user's Snakemake profile folder ($XDG_CONFIG_HOME/snakemake, usually ~/.config/snakemake), where `snakemake --profile NAME` finds it from any directory. Running it again changes nothing. A profile of that name you already have is left alone unless --force, which renames it to NAME.bak<N> first.")
    p.add_argument("name", nargs="?", default="slurm", help="profile under profiles/ (default slurm)")
    p.add_argument("--dest", type=Path, default=None, help="profile folder to install into (default: Snakemake's user profile folder)")
    p.add_argument("--force", action="store_true", help="move an existing profile of that name aside (NAME.bak<N>) instead of stopping")
    p.set_defaults(func=run_install_profile)


def run_install_profile(args: argparse.Namespace) -> int:
    from histopipe.profiles import install_profile

    done = install_profile(args.name, args.dest, args.force)
    if done.action == "already":
        print(f"{done.link} already links to {done.source}; nothing to do")
    elif done.action == "replaced":
        print(f"moved the existing {done.link} to {done.backup}")
    if done.action != "already":
        print(f"linked {done.link} -> {done.source}")
    print(f"use: snakemake --profile {args.name}")
    return 0

