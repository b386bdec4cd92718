"""What the Snakemake workflow needs from the package: the cohort and its target lists.

Kept out of the rule files so that it is unit-tested and the rules stay thin.
"""

from __future__ import annotations

import shlex

from histopipe import paths
from histopipe.errors import ConfigError
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
        self.encoder = paths.encoder_id(config["embedding"]["encoder"])
        self.k = int(config["clustering"]["k"])
        self.map_source = self._map_source()
        p = config["patches"]
        pid = paths.patches_id(p["mpp"], p["patch_size"], p.get("output_size"))
        if self.map_source == "annotation":
            self.dataset_id = f"annotation_{self.tiling_id}_{pid}"
        else:
            self.dataset_id = f"{self.encoder}_{self.tiling_id}_k{self.k}_{pid}"

    def _map_source(self) -> str:
        source = self.config["labels"]["source"]
        annotated = [e.annotation is not None for e in self.entries]
        if source == "annotation" and not all(annotated):
            missing = [e.slide_id for e in self.entries if e.annotation is None][:5]
            raise ConfigError(f"labels.source is 'annotation' but slides {missing} have no annotation in the sheet")
        if source == "auto":
            return "annotation" if all(annotated) else "kmeans"
        return source

    @property
    def slide_ids(self) -> list[str]:
        return [e.slide_id for e in self.entries]

    def slide(self, slide_id: str) -> SlideEntry:
        return self.by_id[slide_id]

    def tile_options(self, slide_id: str) -> str:
        """Per-slide reader flags: backend and µm/px override (``tile``, ``extract-patches``)."""
        e = self.by_id[slide_id]
        opts = ["--backend", e.backend or self.config.get("backend", "auto")]
        if e.mpp is not None:
            opts += ["--slide-mpp", repr(float(e.mpp))]
        return shlex.join(opts)

    def _each(self, template: str, **values: object) -> list[str]:
        return [template.format(results=self.results, slide=s, **values) for s in self.slide_ids]

    # --- per-stage outputs ----------------------------------------------------------
    def tile_stores(self) -> list[str]:
        return self._each(paths.TILES, tiling=self.tiling_id)

    def embedding_stores(self) -> list[str]:
        return self._each(paths.EMBEDDINGS, encoder=self.encoder, tiling=self.tiling_id)

    def cluster_samples(self) -> list[str]:
        return self._each(paths.CLUSTER_SAMPLE, encoder=self.encoder, tiling=self.tiling_id)

    def cluster_name(self) -> str:
        return f"{self.encoder}/{self.tiling_id}/k{self.k}"

    def fitted_cluster_model(self) -> str:
        return paths.CLUSTER_MODEL.format(results=self.results, encoder=self.encoder, tiling=self.tiling_id, k=self.k)

    def cluster_model(self) -> str:
        """The model that assigns tissue types: the config's existing one, else the fitted one."""
        return self.config["clustering"].get("model") or self.fitted_cluster_model()

    def map_store(self, slide_id: str) -> str:
        if self.map_source == "annotation":
            return paths.ANNOTATION_MAP.format(results=self.results, tiling=self.tiling_id, slide=slide_id)
        return paths.TISSUE_MAP.format(results=self.results, encoder=self.encoder, tiling=self.tiling_id, k=self.k, slide=slide_id)

    def map_stores(self) -> list[str]:
        return [self.map_store(s) for s in self.slide_ids]

    def map_files(self) -> list[str]:
        """Map stores with their PNG overlays and GeoJSON."""
        out = []
        for store in self.map_stores():
            base = store[: -len(".zarr")]
            out += [store, base + ".png", base + ".geojson"]
        return out

    def montage(self) -> str:
        return paths.CLUSTER_MONTAGE.format(results=self.results, encoder=self.encoder, tiling=self.tiling_id, k=self.k)

    def slide_patch_stores(self) -> list[str]:
        return self._each(paths.SLIDE_PATCHES, dataset=self.dataset_id)

    def dataset(self) -> str:
        return paths.DATASET.format(results=self.results, dataset=self.dataset_id)

    def vae_model(self) -> str:
        """A pretrained VAE folder from the config, else the one trained on the cohort."""
        return self.config["vae"].get("pretrained") or paths.VAE_MODEL.format(results=self.results, dataset=self.dataset_id)

    @property
    def variants(self) -> list[str]:
        """Model variants to train, synthesise with and evaluate (the ablation's rows)."""
        variants = list(self.config["evaluation"]["variants"])
        main = self.config["ldm"]["variant"]
        return variants if main in variants else [*variants, main]

    def synthetic(self, variant: str) -> str:
        return paths.SYNTHETIC_STORE.format(results=self.results, dataset=self.dataset_id, variant=variant, mode="held-out")

    def segmentation_runs(self) -> list[tuple[str, str]]:
        """(mode, variant) of every DeepLabv3+ run: each variant on synthetic data only, the
        published variant on real + synthetic, and the real-data baseline."""
        runs = [("synthetic", v) for v in self.variants]
        runs.append(("both", self.config["ldm"]["variant"]))
        runs.append(("real", "real"))
        return runs

    def evaluation_outputs(self, kind: str) -> list[str]:
        r, d = self.results, self.dataset_id
        if kind == "distribution":
            return [paths.EVAL_DISTRIBUTION.format(results=r, dataset=d, variant=v) for v in self.variants]
        return [paths.EVAL_SEGMENTATION.format(results=r, dataset=d, mode=m, variant=v) for m, v in self.segmentation_runs()]

    def final_outputs(self) -> list[str]:
        r, d = self.results, self.dataset_id
        out = [
            paths.FAILED_SLIDES.format(results=r),
            paths.TILING_SUMMARY.format(results=r, tiling=self.tiling_id),
            *self.map_files(),
            self.montage(),
            paths.DATASET_INFO.format(results=r, dataset=d),
            paths.CROP_BANK.format(results=r, dataset=d),
        ]
        for v in self.variants:
            out += [
                paths.HALLUCINATION_FLAGS.format(results=r, dataset=d, variant=v, mode="held-out"),
                paths.EVAL_GRID_PNG.format(results=r, dataset=d, variant=v),
            ]
            out.append(paths.FLAGS_FIGURE.format(results=r, dataset=d, variant=v))
            out.append(paths.TRAINING_CURVE.format(results=r, dataset=d, model=f"ldm_{v}"))
        if not self.config["vae"].get("pretrained"):
            out.append(paths.TRAINING_CURVE.format(results=r, dataset=d, model="vae"))
        out += self.ablation_outputs()
        if self.config["clustering"]["student"]["enabled"] and self.map_source == "kmeans":
            out.append(paths.STUDENT_MODEL.format(results=r, encoder=self.encoder, tiling=self.tiling_id, k=self.k))
        return out

    def ablation_outputs(self) -> list[str]:
        """The ablation table (TSV, Markdown, HTML) and its figures."""
        r, d = self.results, self.dataset_id
        out = [paths.ABLATION_TABLE.format(results=r, dataset=d, ext=e) for e in ("tsv", "md", "html")]
        out += [paths.ABLATION_FIGURE.format(results=r, dataset=d, metric=m) for m in ("fd", "precision", "recall", "miou")]
        return out
