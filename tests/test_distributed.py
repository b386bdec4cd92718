"""Several training processes through the real launcher (torchrun, gloo on the CPU).

The tiny LDM is trained by ``histopipe train-ldm`` with ``ldm.gpus: 2`` (the command starts
itself under torchrun) and with ``gpus: 1``, same global batch and seed. Both runs see the
same global batches and average the same gradients; only the random draws differ (noise,
timesteps: each process has its own generator), so the per-step losses agree within a
tolerance, not exactly. A 2-process run whose second process dies after a checkpoint ends
(no hang) and resumes in one process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
import zarr

from histopipe.diffusion.models import build_vae
from histopipe.diffusion.training import StreamBatchSampler, complete_checkpoints
from histopipe.distributed import CRASH_ENV, launch_command, per_process_batch
from histopipe.errors import ConfigError
from tests.diffusion_helpers import tiny_vae, write_patch_store

STEPS = 6
# Per-step loss of 2 processes against 1 (relative): the random draws differ, the data and
# the averaged gradients do not. Measured (6 steps): at most 0.13 per step, 0.003 on the mean.
STEP_RTOL = 0.25
MEAN_RTOL = 0.08

# torchrun gives each process one thread; the one-process runs get one too, so that both
# sum in the same order (CPU kernels with more threads round differently).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

LDM = dict(
    block_out_channels=[32, 64], layers_per_block=1, attention_heads=2, cross_attention_dim=32, map_embed_dim=4,
    max_crops=3, crop_feature_encoder="thumbnail", lr=1e-3, weight_decay=0.0, ema_decay=0.9, augment_stain=0.0,
    augment_brightness=0.0, sample_steps=2, batch_size=4, num_workers=0, warmup_steps=0, lr_schedule="constant",
    checkpoint_every=2, sample_every=0, eval_every=0, log_every=1, mixed_precision="fp32", seed=0, augment_flip=False,
    max_steps=STEPS, p_drop_map=0.0, p_drop_crops=0.0,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    store = write_patch_store(root / "patches.zarr")
    torch.manual_seed(0)
    build_vae(tiny_vae(), 32).save_pretrained(root / "vae")
    return root, store, root / "vae"


def _train(inputs, name: str, gpus: int, env: dict | None = None, timeout: int = 1500) -> subprocess.CompletedProcess:
    root, store, vae = inputs
    cfg = root / f"{name}-{gpus}.yaml"
    cfg.write_text(yaml.safe_dump({"ldm": {**LDM, "gpus": gpus}}))
    cmd = [sys.executable, "-m", "histopipe", "train-ldm", "--dataset", str(store), "--vae", str(vae),
           "--out", str(root / name), "--config", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ONE_THREAD, **(env or {})})


def _losses(out) -> np.ndarray:
    """The logged loss of each step (the newest value where a resumed run logged it again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step = {}
    for events in sorted((out / "logs").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            for e in acc.Scalars("loss"):
                by_step.setdefault(e.step, []).append((e.wall_time, e.value))
    return np.array([max(by_step[s])[1] for s in sorted(by_step)])


@pytest.fixture(scope="module")
def one_process(inputs):
    run = _train(inputs, "one", 1)
    assert run.returncode == 0, run.stderr[-4000:]
    return _losses(inputs[0] / "one")


def test_global_batches_are_the_same_for_any_process_count():
    for world in (2, 4):
        one = iter(StreamBatchSampler(10, 4, seed=3))
        streams = [iter(StreamBatchSampler(10, 4, seed=3, rank=r, world=world)) for r in range(world)]
        for _ in range(6):  # across epochs (10 samples, batches of 4)
            assert sum((next(s) for s in streams), []) == next(one)
    full = iter(StreamBatchSampler(10, 4, seed=3))
    batches = [next(full) for _ in range(7)]
    resumed = [iter(StreamBatchSampler(10, 4, seed=3, start=5, rank=r, world=2)) for r in range(2)]
    for b in batches[5:]:  # resuming at global batch 5 with 2 processes continues the same stream
        assert next(resumed[0]) + next(resumed[1]) == b


def test_global_batch_must_divide_over_the_processes():
    assert per_process_batch(32, 4, "ldm") == 8
    with pytest.raises(ConfigError, match=r"config.ldm.batch_size=6 .* 4 processes"):
        per_process_batch(6, 4, "ldm")
    assert launch_command(2, ["train-ldm", "--out", "x"])[1:6] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]


def test_bad_batch_is_one_line_before_any_process_starts(inputs):
    root, store, vae = inputs
    cfg = root / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"ldm": {**LDM, "gpus": 3}}))
    run = subprocess.run([sys.executable, "-m", "histopipe", "train-ldm", "--dataset", str(store), "--vae", str(vae),
                          "--out", str(root / "bad"), "--config", str(cfg)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "histopipe train-ldm: error: config.ldm.batch_size=4 is the global batch and must divide by the 3 processes of ldm.gpus=3")
    assert not (root / "bad").exists()


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss(inputs, one_process):
    run = _train(inputs, "two", 2)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    two = _losses(inputs[0] / "two")
    assert len(two) == len(one_process) == STEPS
    rel = np.abs(two - one_process) / one_process
    assert rel.max() < STEP_RTOL, (one_process, two)
    assert abs(two.mean() - one_process.mean()) / one_process.mean() < MEAN_RTOL, (one_process, two)
    out = inputs[0] / "two"
    assert (out / "model" / "model_index.json").is_file()
    ckpt = out / "checkpoints" / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in ckpt.glob("generator_*.pt")) == ["generator_0.pt", "generator_1.pt"]
    # The main process logs alone: every TensorBoard file (losses, hparams) names one process id.
    writers = {re.search(r"\.(\d+)\.\d+$", p.name).group(1) for p in (out / "logs").rglob("events.out.tfevents.*")}
    assert len(writers) == 1, writers


@pytest.mark.slow
def test_a_dying_process_ends_the_job_and_the_rerun_resumes_in_one_process(inputs, one_process):
    out = inputs[0] / "crash"
    run = _train(inputs, "crash", 2, env={CRASH_ENV: "3:1"}, timeout=1500)  # process 1 dies after step 3
    assert run.returncode != 0
    assert [step for step, _ in complete_checkpoints(out / "checkpoints")] == [2]
    assert not (out / "model").exists()
    rerun = _train(inputs, "crash", 1)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "resumed from" in rerun.stderr and "(step 2, 1 process(es))" in rerun.stderr
    assert [step for step, _ in complete_checkpoints(out / "checkpoints")][-1] == STEPS
    assert (out / "model" / "model_index.json").is_file()
    resumed = _losses(out)
    assert len(resumed) == STEPS
    assert (np.abs(resumed - one_process) / one_process).max() < STEP_RTOL, (one_process, resumed)


@pytest.mark.slow
def test_synthesis_in_two_processes_gives_the_one_process_output(inputs):
    from histopipe.diffusion.data import open_training_set, store_info
    from histopipe.diffusion.tasks import LDMTask, reference_batch
    from tests.diffusion_helpers import LABEL_NAMES, tiny_ldm

    root, store, _ = inputs
    train_set = open_training_set(store, "train")
    torch.manual_seed(0)
    task = LDMTask(tiny_ldm(), build_vae(tiny_vae(), 32), 32, store_info(store)["level_luts"], reference_batch(train_set, 2),
                   LABEL_NAMES, 0.5)
    task.pipeline(task.model.eval()).save_pretrained(root / "pipe")
    stores = {}
    for gpus in (1, 2):
        cfg = root / f"synth-{gpus}.yaml"
        # 5 maps in batches of 2: 3 batches, 2 for the first process and 1 for the second.
        cfg.write_text(yaml.safe_dump({"synthesis": {"gpus": gpus, "steps": 2, "batch_size": 2, "sampler": "ddim"}}))
        out = root / f"synth-{gpus}"
        run = subprocess.run([sys.executable, "-m", "histopipe", "synthesize", "--model", str(root / "pipe"), "--out", str(out),
                              "--mode", "held-out", "--dataset", str(store), "--split", "train", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=1500, env={**os.environ, **ONE_THREAD})
        assert run.returncode == 0, run.stderr[-4000:]
        assert not (out / "parts").exists()
        stores[gpus] = zarr.open_group(str(out / "synthetic.zarr"), mode="r")
        assert (out / "manifest.csv").read_text() == (root / "synth-1" / "manifest.csv").read_text()
    one, two = stores[1], stores[2]
    assert one["images"].shape == (5, 32, 32, 3)
    for name in ("images", "maps", "seed", "crop_boxes", "crop_canvas"):
        np.testing.assert_array_equal(one[name][:], two[name][:], err_msg=name)


def test_workflow_refuses_impossible_gpu_requests_at_parse_time():
    from histopipe.config import load_preset
    from histopipe.workflow import check_gpus

    large = load_preset("large")
    check_gpus(large, node_gpus=8)
    assert (large["ldm"]["gpus"], large["vae"]["gpus"], large["synthesis"]["gpus"]) == (8, 4, 8)
    with pytest.raises(ConfigError, match=r"^config.ldm.gpus=8 but the profile allows gpu=4 per node"):
        check_gpus(large, node_gpus=4)
    large["ldm"]["batch_size"] = 60
    with pytest.raises(ConfigError, match=r"config.ldm.batch_size=60 is the global batch and must divide by the 8 processes"):
        check_gpus(large)


@pytest.mark.slow
def test_slurm_dry_run_asks_for_the_configured_gpus(cmu_slide, tmp_path):
    """``snakemake -n`` with the real SLURM profile: the LDM job asks for 2 GPUs (and twice
    the CPUs and memory), embedding for 1; the plugin turns that into ``--gpus=N``."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.utils import set_gres_string

    from tests.helpers import snakemake

    (tmp_path / "slides.tsv").write_text(f"slide_id\tpath\ncmu1\t{cmu_slide}\n")
    (tmp_path / "gpus.yaml").write_text(yaml.safe_dump({"ldm": {"gpus": 2, "batch_size": 8}}))
    r = snakemake(tmp_path, "-n", "--config", f"sheet={tmp_path / 'slides.tsv'}", f"results={tmp_path / 'results'}",
                  profile="profiles/slurm", extra_configs=(tmp_path / "gpus.yaml",), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr

    def jobs(rule: str) -> list[dict[str, str]]:
        blocks = re.findall(rf"rule {rule}:\n(?:.*\n)*?\s+resources: (.*)", out)
        return [dict(kv.split("=", 1) for kv in b.split(", ")) for b in blocks]

    def sbatch_gpus(resources: dict[str, str]) -> str:
        job = SimpleNamespace(resources=SimpleNamespace(get=lambda k, d=None: resources.get(k, d), gres=None))
        return set_gres_string(job).strip()

    ldm, embed = jobs("train_ldm"), jobs("embed_tiles")
    assert ldm and embed, out[-3000:]
    for job in ldm:
        assert job["gpu"] == "2" and int(job["mem_mb"]) == 2 * 32000
        assert sbatch_gpus(job) == "--gpus=2"
    for job in embed:
        assert job["gpu"] == "1" and sbatch_gpus(job) == "--gpus=1"
    assert all(job.get("gpu") == "1" for job in jobs("synthesize"))

    (tmp_path / "too_many.yaml").write_text(yaml.safe_dump({"ldm": {"gpus": 16, "batch_size": 16}}))
    r = snakemake(tmp_path, "-n", "--config", f"sheet={tmp_path / 'slides.tsv'}", f"results={tmp_path / 'results'}",
                  profile="profiles/slurm", extra_configs=(tmp_path / "too_many.yaml",), timeout=900)
    assert r.returncode != 0
    assert "config.ldm.gpus=16 but the profile allows gpu=8 per node" in r.stdout + r.stderr
