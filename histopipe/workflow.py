"""What the Snakemake workflow needs from the package: the cohort and its target lists.

Kept out of the rule files so that it is unit-tested and the rules stay thin.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from histopipe import paths
from histopipe.errors import ConfigError
from histopipe.label_space import (
    PIPELINE_INDEX,
    LabelSpace,
    check_pipeline,
    pipeline_label_space,
    pipeline_record,
)
from histopipe.sheet import SlideEntry
from histopipe.tiling import TilingConfig

# Config sections of the jobs that may run on several GPUs of one node (key: gpus); in the
# training ones batch_size is the global batch, divided over the processes.
MULTI_GPU = ("vae", "ldm", "nuclei.train", "synthesis")
TRAINING = ("vae", "ldm", "nuclei.train")


def _section(config: dict, key: str) -> dict:
    for part in key.split("."):
        config = config.get(part, {})
    return config


def job_gpus(config: dict, key: str) -> int:
    """GPUs (one process each) of the job configured by section ``key`` (e.g. ``ldm``)."""
    return int(_section(config, key).get("gpus", 1))


def check_gpus(config: dict, node_gpus: int | None = None) -> None:
    """Refuse, before any job starts, a multi-GPU setting that cannot run: a global batch
    that does not divide over the processes, or more GPUs than a node has (``node_gpus``,
    the profile's ``gpu`` resource; None: not checked)."""
    from histopipe.distributed import per_process_batch

    for key in MULTI_GPU:
        if key == "vae" and config["vae"].get("pretrained"):
            continue
        if key.startswith("nuclei") and not config.get("nuclei", {}).get("enabled"):
            continue
        gpus = job_gpus(config, key)
        if key in TRAINING:
            per_process_batch(int(_section(config, key).get("batch_size", 1)), gpus, key)
        if node_gpus is not None and gpus > node_gpus:
            raise ConfigError(
                f"config.{key}.gpus={gpus} but the profile allows gpu={node_gpus} per node "
                f"(raise the profile's `gpu` resource, or --resources gpu=N, where nodes have more)"
            )


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
        size = int(config.get("slides_per_batch", 50))
        ids = [e.slide_id for e in entries]
        # Consecutive sheet rows: appending slides leaves every earlier batch as it was.
        self.batches = {f"{i // size:05d}": ids[i:i + size] for i in range(0, len(ids), size)}
        self.batch_of = {s: b for b, members in self.batches.items() for s in members}
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
        return [template.format(results=self.results, slide=s, batch=self.batch_of[s], **values) for s in self.slide_ids]

    def _batch_dirs(self, template: str, **values: object) -> list[str]:
        return [template.format(results=self.results, batch=b, **values) for b in self.batches]

    def batch_members(self, template: str, batch: str, **values: object) -> list[str]:
        """``template`` filled for each slide of ``batch`` (a batch job's per-slide inputs)."""
        return [template.format(results=self.results, slide=s, batch=batch, **values) for s in self.batches[batch]]

    # --- per-stage outputs ----------------------------------------------------------
    def tile_stores(self) -> list[str]:
        return self._each(paths.TILES, tiling=self.tiling_id)

    def embedding_stores(self) -> list[str]:
        return self._each(paths.EMBEDDINGS, encoder=self.encoder, tiling=self.tiling_id)

    def cluster_samples(self) -> list[str]:
        return self._each(paths.CLUSTER_SAMPLE, encoder=self.encoder, tiling=self.tiling_id)

    def cluster_sample_batches(self) -> list[str]:
        return self._batch_dirs(paths.CLUSTER_SAMPLE_BATCH, encoder=self.encoder, tiling=self.tiling_id)

    def cluster_summaries(self) -> list[str]:
        """One summary store per batch (``clustering.method: two_level``)."""
        return self._batch_dirs(paths.CLUSTER_SUMMARY, encoder=self.encoder, tiling=self.tiling_id)

    @property
    def fits_clusters(self) -> bool:
        """Whether the workflow fits tissue types: not with ``clustering.model`` set, and not
        when the fitted model already exists unless ``clustering.refit`` asks for it, so
        slides appended to the sheet are assigned to the types already fitted."""
        c = self.config["clustering"]
        if c.get("model"):
            return False
        return bool(c.get("refit")) or not Path(self.fitted_cluster_model()).is_dir()

    def cluster_name(self) -> str:
        return f"{self.encoder}/{self.tiling_id}/k{self.k}"

    def fitted_cluster_model(self) -> str:
        return paths.CLUSTER_MODEL.format(results=self.results, encoder=self.encoder, tiling=self.tiling_id, k=self.k)

    def cluster_model(self) -> str:
        """The model that assigns tissue types: the config's existing one, else the fitted one."""
        return self.config["clustering"].get("model") or self.fitted_cluster_model()

    def _map_template(self, batch: bool) -> str:
        if self.map_source == "annotation":
            return paths.ANNOTATION_MAP_BATCH if batch else paths.ANNOTATION_MAP
        return paths.TISSUE_MAP_BATCH if batch else paths.TISSUE_MAP

    def map_store(self, slide_id: str) -> str:
        return self._map_template(False).format(results=self.results, encoder=self.encoder, tiling=self.tiling_id,
                                                k=self.k, batch=self.batch_of[slide_id], slide=slide_id)

    def map_stores(self) -> list[str]:
        return [self.map_store(s) for s in self.slide_ids]

    def map_batch(self, batch: str) -> str:
        return self._map_template(True).format(results=self.results, encoder=self.encoder, tiling=self.tiling_id,
                                               k=self.k, batch=batch)

    def map_batches(self) -> list[str]:
        """The batch folders of the maps: each holds <slide>.zarr, .png and .geojson per slide."""
        return [self.map_batch(b) for b in self.batches]

    def map_id(self) -> str:
        """The folder name of the maps' settings: ``<encoder>/<tiling>/k<k>`` or ``annotation/<tiling>``."""
        return f"annotation/{self.tiling_id}" if self.map_source == "annotation" else self.cluster_name()

    def tile_qc_dirs(self) -> list[str]:
        return self._each(paths.TILE_QC, tiling=self.tiling_id)

    def slide_table(self, ext: str) -> str:
        return paths.SLIDE_TABLE.format(results=self.results, maps=self.map_id(), ext=ext)

    def report_slides(self) -> str:
        return paths.REPORT_SLIDES.format(results=self.results, maps=self.map_id())

    def montage(self) -> str:
        return paths.CLUSTER_MONTAGE.format(results=self.results, encoder=self.encoder, tiling=self.tiling_id, k=self.k)

    def slide_patch_stores(self) -> list[str]:
        return self._each(paths.SLIDE_PATCHES, dataset=self.dataset_id)

    def slide_patch_batches(self) -> list[str]:
        return self._batch_dirs(paths.SLIDE_PATCHES_BATCH, dataset=self.dataset_id)

    # --- batch jobs -------------------------------------------------------------------
    def batch_commands(self, stage: str, batch: str, out_dir: str, config_json: str = "{}",
                       on_error: str = "fail") -> list[list[str]]:
        """The ``histopipe`` argument lists one batch job runs, one per slide, writing
        ``<out_dir>/<slide>.zarr`` (maps also ``.png`` and ``.geojson``).

        ``stage``: ``sample`` (sample-embeddings), ``map`` (assign-clusters or
        annotation-map, by the map source), ``nuclei_tiles`` (nuclei-wsi-tiles) or
        ``patches`` (extract-patches).
        """
        cmds = []
        for s in self.batches[batch]:
            out = f"{out_dir}/{s}.zarr"
            emb = paths.EMBEDDINGS.format(results=self.results, encoder=self.encoder, tiling=self.tiling_id, slide=s)
            tiles = paths.TILES.format(results=self.results, tiling=self.tiling_id, slide=s)
            views = ["--png", f"{out_dir}/{s}{paths.MAP_PNG_SUFFIX}", "--geojson", f"{out_dir}/{s}{paths.MAP_GEOJSON_SUFFIX}"]
            if stage == "sample":
                cmds.append(["sample-embeddings", emb, "--out", out, "--config-json", config_json])
            elif stage == "map" and self.map_source == "annotation":
                e = self.by_id[s]
                cmds.append(["annotation-map", str(e.path), str(e.annotation), "--tiles", tiles,
                             "--labels", str(self.config["labels"]["annotation_labels"] or ""), "--out", out, *views])
            elif stage == "map":
                cmds.append(["assign-clusters", self.cluster_model(), emb, tiles, "--out", out, *views])
            elif stage == "nuclei_tiles":
                cmds.append(["nuclei-wsi-tiles", str(self.by_id[s].path), tiles, "--out", out, "--slide-id", s,
                             *shlex.split(self.tile_options(s)), "--config-json", config_json])
            elif stage == "patches":
                cmds.append(["extract-patches", self.map_store(s), str(self.by_id[s].path), "--out", out,
                             "--slide-id", s, *shlex.split(self.tile_options(s)), "--on-error", on_error,
                             "--config-json", config_json])
            else:
                raise ValueError(f"unknown batch stage {stage!r}")
        return cmds

    def dataset(self) -> str:
        return paths.DATASET.format(results=self.results, dataset=self.dataset_id)

    def vae_model(self) -> str:
        """A pretrained VAE folder from the config, else the one trained on the cohort."""
        return self.config["vae"].get("pretrained") or paths.VAE_MODEL.format(results=self.results, dataset=self.dataset_id)

    # --- trained models reused (ldm.models) -----------------------------------------------
    def reused_ldm(self, variant: str) -> str | None:
        """The trained pipeline ``ldm.models`` gives for ``variant`` (None: trained here)."""
        models = self.config["ldm"].get("models") or {}
        if isinstance(models, str):
            return str(Path(models) / f"ldm_{variant}" / "model")
        return models.get(variant)

    def ldm_model(self, variant: str) -> str:
        """The pipeline that synthesises ``variant``: a reused one, else the one trained here."""
        return self.reused_ldm(variant) or paths.LDM_MODEL.format(results=self.results, dataset=self.dataset_id, variant=variant)

    @property
    def trained_variants(self) -> list[str]:
        return [v for v in self.variants if not self.reused_ldm(v)]

    @property
    def trains_vae(self) -> bool:
        """Whether the workflow trains the autoencoder: not with ``vae.pretrained``, and not
        when every variant's pipeline (which holds its own VAE) is reused."""
        return not self.config["vae"].get("pretrained") and bool(self.trained_variants)

    def expected_label_space(self) -> LabelSpace | None:
        """The label space of this cohort's maps, as far as it is known before any job runs:
        None when the maps' tissue types are still to be fitted."""
        if self.map_source == "annotation":
            return LabelSpace(source="annotation", num_labels=0)
        if self.fits_clusters:
            return None
        from histopipe.clustering import ClusterModel

        folder = self.cluster_model()
        model = ClusterModel.load(folder)
        return LabelSpace("kmeans", model.k + 1, tuple(model.label_names()), model.model_id, folder)

    def check_cluster_model(self) -> None:
        """An existing ``clustering.model`` must have the configured k: the maps' folders and
        the dataset are named after ``clustering.k``."""
        folder = self.config["clustering"].get("model")
        if not folder or self.map_source != "kmeans":
            return
        from histopipe.clustering import ClusterModel

        model = ClusterModel.load(folder)
        if model.k != self.k:
            raise ConfigError(f"clustering.model {folder} has k={model.k} tissue types but clustering.k is {self.k}; set clustering.k: {model.k}")

    def check_reuse(self) -> None:
        """Refuse, before any job runs, ``ldm.models`` pipelines that do not fit this cohort:
        missing, of another variant, or trained on another label space, µm/px or patch size."""
        self.check_cluster_model()
        reused = {v: self.reused_ldm(v) for v in self.variants if self.reused_ldm(v)}
        models = self.config["ldm"].get("models") or {}
        unknown = [] if isinstance(models, str) else sorted(set(models) - set(self.variants))
        if unknown:
            raise ConfigError(f"ldm.models: {unknown} not among the evaluated variants {self.variants} (evaluation.variants)")
        if not reused:
            return
        expected = self.expected_label_space()
        p = self.config["patches"]
        size = int(p.get("output_size") or p["patch_size"])
        mpp = float(p["mpp"]) * int(p["patch_size"]) / size
        problems = []
        for variant, folder in reused.items():
            if not Path(folder, PIPELINE_INDEX).is_file():
                problems.append(f"{variant} ({folder}): not a trained pipeline folder (no {PIPELINE_INDEX})")
                continue
            if expected is None:
                recorded = pipeline_label_space(pipeline_record(folder)).cluster_model
                problems.append(
                    f"{variant} ({folder}): this cohort fits new tissue types (clustering.model is not set, or "
                    f"clustering.refit is), the pipeline knows only those it was trained on; set clustering.model "
                    f"to that model ({recorded or 'not recorded in the pipeline'})"
                )
                continue
            issues = check_pipeline(folder, variant, expected, mpp, size)
            if issues:
                problems.append(f"{variant} ({folder}): " + "; ".join(issues) + " (pipeline vs this cohort)")
        if problems:
            raise ConfigError("ldm.models: trained pipelines that do not fit this cohort:\n  " + "\n  ".join(problems))

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

    def crop_bank(self) -> str:
        return paths.CROP_BANK.format(results=self.results, dataset=self.dataset_id)

    def segmenter(self) -> str:
        """The real-arm DeepLabv3+ model: the label-fidelity judge (evaluation and training)."""
        return paths.SEGMENTER.format(results=self.results, dataset=self.dataset_id)

    def evaluation_outputs(self, kind: str) -> list[str]:
        r, d = self.results, self.dataset_id
        if kind in ("distribution", "fidelity"):  # the real row is the reference of every measure
            path = paths.EVAL_DISTRIBUTION if kind == "distribution" else paths.EVAL_FIDELITY
            return [path.format(results=r, dataset=d, variant=v) for v in [*self.variants, "real"]]
        return [paths.EVAL_SEGMENTATION.format(results=r, dataset=d, mode=m, variant=v) for m, v in self.segmentation_runs()]

    def final_outputs(self) -> list[str]:
        r, d = self.results, self.dataset_id
        out = [
            paths.FAILED_SLIDES.format(results=r),
            paths.TILING_SUMMARY.format(results=r, tiling=self.tiling_id),
            *self.map_batches(),
            self.slide_table("html"),
            self.montage(),
            paths.DATASET_INFO.format(results=r, dataset=d),
            self.crop_bank(),
        ]
        for v in self.variants:
            out += [
                paths.HALLUCINATION_FLAGS.format(results=r, dataset=d, variant=v, mode="held-out"),
                paths.EVAL_GRID_PNG.format(results=r, dataset=d, variant=v),
            ]
            out.append(paths.FLAGS_FIGURE.format(results=r, dataset=d, variant=v))
            if not self.reused_ldm(v):
                out.append(paths.TRAINING_CURVE.format(results=r, dataset=d, model=f"ldm_{v}"))
        if self.trains_vae:
            out.append(paths.TRAINING_CURVE.format(results=r, dataset=d, model="vae"))
        out += self.ablation_outputs()
        if self.config["clustering"]["student"]["enabled"] and self.map_source == "kmeans":
            out.append(paths.STUDENT_MODEL.format(results=r, encoder=self.encoder, tiling=self.tiling_id, k=self.k))
        if self.config["nuclei"]["enabled"]:
            out += self.nuclei_outputs()
        return out

    # --- nuclei branch ------------------------------------------------------------------
    @property
    def nuclei_mode(self) -> str:
        return self.config["nuclei"]["model"]["mode"]

    def nuclei_wsi_batches(self) -> list[str]:
        """Unlabeled nuclei patches of the cohort's slides (none when nuclei.data.wsi_tiles is 0)."""
        if not self.config["nuclei"]["data"]["wsi_tiles"]:
            return []
        return self._batch_dirs(paths.NUCLEI_WSI_BATCH, tiling=self.tiling_id)

    def nuclei_outputs(self) -> list[str]:
        """The nuclei branch's targets: metrics tables, the synthetic store, the layout
        model and the WSI nuclei patches."""
        r, m = self.results, self.nuclei_mode
        out = [paths.NUCLEI_METRICS.format(results=r, mode=m, ext=e) for e in ("tsv", "json", "md")]
        out += [paths.NUCLEI_SYNTHETIC_STORE.format(results=r, mode=m), paths.NUCLEI_LAYOUT.format(results=r)]
        return out + self.nuclei_wsi_batches()

    def ablation_outputs(self) -> list[str]:
        """The ablation table (TSV, Markdown, HTML) and its figures."""
        r, d = self.results, self.dataset_id
        out = [paths.ABLATION_TABLE.format(results=r, dataset=d, ext=e) for e in ("tsv", "md", "html")]
        metrics = ("fd", "precision", "recall", "label_miou", "crop_fidelity", "miou")
        out += [paths.ABLATION_FIGURE.format(results=r, dataset=d, metric=m) for m in metrics]
        out.append(paths.EVAL_VARIANTS_PNG.format(results=r, dataset=d))
        return out
