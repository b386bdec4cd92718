"""Installing the repository's Snakemake profiles where Snakemake finds them by name.

``snakemake --profile slurm`` looks for a folder ``slurm`` in the current directory, then in
the user's Snakemake profile folder (``$XDG_CONFIG_HOME/snakemake``, usually
``~/.config/snakemake``), then in the site folder (``/etc/xdg/snakemake``). Installing links
``profiles/<name>`` there, so that the short form works from any directory and edits of the
repository's profile (the lines marked EDIT) apply without reinstalling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from histopipe.errors import HistopipeError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


def user_profile_dir() -> Path:
    """The user's Snakemake profile folder, as Snakemake itself computes it (platformdirs,
    ``$XDG_CONFIG_HOME`` honoured)."""
    from platformdirs import AppDirs

    return Path(AppDirs("snakemake", "snakemake").user_config_dir)


@dataclass(frozen=True)
class Installed:
    """What :func:`install_profile` did: ``action`` is ``linked``, ``already`` (the link was
    there, nothing changed) or ``replaced`` (a different profile moved to ``backup``)."""

    link: Path
    source: Path
    action: str
    backup: Path | None = None


def install_profile(name: str = "slurm", dest: Path | None = None, force: bool = False) -> Installed:
    """Link ``profiles/<name>`` as ``<dest>/<name>`` (``dest``: the user's Snakemake profile
    folder by default). Idempotent: an existing link to the same folder is left as it is.

    Anything else already named ``<name>`` there is the user's own profile: without ``force``
    this raises and changes nothing; with ``force`` it is renamed to ``<name>.bak<N>`` (first
    free N), never deleted.
    """
    source = PROFILES_DIR / name
    if not (source / "config.yaml").is_file():
        known = sorted(p.name for p in PROFILES_DIR.iterdir() if (p / "config.yaml").is_file())
        raise HistopipeError(f"{source}: no profile {name!r} in this repository (profiles: {', '.join(known)})")
    dest = Path(dest) if dest is not None else user_profile_dir()
    link = dest / name
    if link.is_symlink() and link.resolve() == source.resolve():
        return Installed(link, source, "already")
    backup = None
    if link.exists() or link.is_symlink():
        what = f"a link to {os.readlink(link)}" if link.is_symlink() else "a folder" if link.is_dir() else "a file"
        if not force:
            raise HistopipeError(
                f"{link} exists ({what}) and is not this repository's profile; left unchanged. "
                f"Rerun with --force to move it to {link.name}.bak<N> and install, or use "
                f"`snakemake --profile {source}` directly")
        n = 1
        while (dest / f"{name}.bak{n}").exists() or (dest / f"{name}.bak{n}").is_symlink():
            n += 1
        backup = dest / f"{name}.bak{n}"
        link.rename(backup)
    dest.mkdir(parents=True, exist_ok=True)
    link.symlink_to(source.resolve(), target_is_directory=True)
    return Installed(link, source, "replaced" if backup else "linked", backup)
