"""What the Snakemake workflow needs from the package: the cohort and its target lists.

Kept out of the rule files so that it is unit-tested and the rules stay thin.
"""

from __future__ import annotations

import shlex

from histopipe import paths
from histopipe.sheet import SlideEntry
from histopipe.tiling import TilingConfig


class Cohort:
    """The validated cohort sheet plus the config, with the output lists of each stage."""

    def __init__(self, entries: list[SlideEntry], config: dict):
        self.entries = entries
        self.by_id = {e.slide_id: e for e in entries}
        self.config = config
        self.results = config["results"]
        self.tiling = TilingConfig(**config["tiling"])
        self.tiling_id = self.tiling.id

    @property
    def slide_ids(self) -> list[str]:
        return [e.slide_id for e in self.entries]

    def slide(self, slide_id: str) -> SlideEntry:
        return self.by_id[slide_id]

    def tile_options(self, slide_id: str) -> str:
        """Per-slide flags of ``histopipe tile``: reader backend and µm/px override."""
        e = self.by_id[slide_id]
        opts = ["--backend", e.backend or self.config.get("backend", "auto")]
        if e.mpp is not None:
            opts += ["--slide-mpp", repr(float(e.mpp))]
        return shlex.join(opts)

    def tile_stores(self) -> list[str]:
        return [paths.TILES.format(results=self.results, tiling=self.tiling_id, slide=s) for s in self.slide_ids]

    def final_outputs(self) -> list[str]:
        r = self.results
        return [
            *self.tile_stores(),
            paths.FAILED_SLIDES.format(results=r),
            paths.TILING_SUMMARY.format(results=r, tiling=self.tiling_id),
        ]
