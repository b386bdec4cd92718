"""``histopipe install-profile`` (Snakemake profiles by name) and ``histopipe status`` (where
a cohort's run stands)."""

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
    register_status(sub)


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


def register_status(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("status", help="where a cohort's run stands: per stage done / failed / started / pending, failed slides and why, time per stage",
                       description="Read the cohort sheet and the files under the results folder (never Snakemake's job graph, so it takes seconds at 10 000 slides, while a run is going) and print, per stage, how many slides are done, failed, started (a log but no output: running, or killed without a message) or pending; the cohort-level steps; the time spent per stage from the Snakemake benchmark files; and every failed slide with its reason. When the results folder holds outputs of other settings (tiling, encoder, k, patches) but none of the config's, it says which it found and which it expected.")
    s.add_argument("--config", type=Path, nargs="+", required=True, metavar="FILE",
                   help="the workflow's config files, in the order given to snakemake --configfile (later ones win)")
    s.add_argument("--sheet", default=None, help="cohort sheet (default: the config's `sheet`, like --config sheet=…)")
    s.add_argument("--results", default=None, help="results folder (default: the config's `results`)")
    s.add_argument("--max-failures", type=int, default=50, help="failed slides listed (default 50)")
    s.add_argument("--failed-tsv", type=Path, default=None, help="write every failure (slide, stage, reason) to this TSV")
    s.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    from histopipe.atomic import atomic_write_text
    from histopipe.config import load_configs
    from histopipe.sheet import read_sheet
    from histopipe.status import cohort_status, failures_tsv, format_status
    from histopipe.workflow import Cohort

    cfg = load_configs(args.config, {k: v for k, v in (("sheet", args.sheet), ("results", args.results)) if v is not None})
    status = cohort_status(Cohort(read_sheet(cfg["sheet"], check_files=False), cfg))
    print(format_status(status, args.max_failures))
    if args.failed_tsv:
        atomic_write_text(args.failed_tsv, failures_tsv(status.failures))
    return 0
