"""The ``accelerate`` training loop shared by the VAE and the latent diffusion model.

One process per GPU (``gpus: N`` in the model's config section: the command starts itself
under torchrun, see ``histopipe.distributed``) or a single CPU/GPU process; bf16 autocast on
CUDA; gradient accumulation; EMA of the trained weights; warm-up + cosine/constant LR.

Several processes train exactly the batches one process would: ``batch_size`` is the global
batch, each process takes its slice of every global batch (``batch_size / N`` samples) and
DDP averages the gradients. The main process alone keeps the EMA and writes checkpoints,
logs, sample grids, evaluations and the export. Data order and LR schedule depend on the
step only, so a run may resume with a different number of processes.

Resumption: every ``checkpoint_every`` optimizer steps the full state (weights, optimizer,
LR scheduler, EMA, the explicit random generator, the global RNGs and the step) is written by
``accelerator.save_state`` into ``checkpoints/.checkpoint-<step>.partial`` and renamed to
``checkpoints/checkpoint-<step>`` once complete (a rename is atomic, so a job killed while
saving leaves the previous checkpoint as the newest complete one). Each checkpoint also
holds ``model/``, the ``save_pretrained`` export with EMA weights, so it can be sampled from.
On start the newest complete checkpoint is loaded. All randomness of a step (data order,
augmentation, noise, timesteps, condition dropping) comes from the step count and an explicit
generator that is checkpointed, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from histopipe.atomic import atomic_path, atomic_write_text
from histopipe.diffusion.settings import TrainLoopSettings
from histopipe.distributed import in_launched_process, maybe_crash
from histopipe.errors import HistopipeError

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
MODEL_DIR = "model"  # the save_pretrained export, in the output folder and in each checkpoint
PROGRESS_FILE = "progress.jsonl"  # one JSON line per evaluation: {"step": ..., metrics}


class Task(Protocol):
    """What the loop trains: a module, its loss, sample grids and the final export."""

    name: str  # TensorBoard run name
    model: nn.Module  # the trained module (frozen parts may live inside with requires_grad False)

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move frozen helpers (VAE, feature encoders) to the device in the compute dtype."""

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        """Scalar loss of one micro-batch; all randomness from ``gen``."""

    def sample_grid(self, model: nn.Module) -> np.ndarray | None:
        """uint8 (H, W, 3) image to log, or None."""

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Progress metrics of the (EMA) weights on held-out data, logged as ``eval/<name>``."""

    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the trained model (``save_pretrained``) into ``folder``."""


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step of this run
    model_dir: Path | None = None
    resumed_from: int = 0
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update had non-finite gradients


class StreamBatchSampler(Sampler):
    """Global batches of consecutive indices from an endless stream of per-epoch
    permutations, each process taking its slice.

    Epoch e is ``randperm(n)`` seeded with ``seed + e``; global batch j of the stream depends
    only on (seed, j), so training resumes at batch ``start`` with the same data order, with
    any number of processes. Process ``rank`` of ``world`` gets samples ``[rank * b, (rank +
    1) * b)`` of each global batch (``b = batch_size / world``). Batches may straddle epochs
    (small datasets still give full batches).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if n < 1:
            raise HistopipeError("the training set is empty")
        if batch_size % world:
            raise HistopipeError(f"the global batch of {batch_size} does not divide over {world} processes")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world

    def _epoch(self, e: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e)).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start * self.batch_size
        e, offset = divmod(pos, self.n)
        buf = self._epoch(e)[offset:]
        b = self.batch_size // self.world
        while True:
            while len(buf) < self.batch_size:
                e += 1
                buf += self._epoch(e)
            yield buf[self.rank * b : (self.rank + 1) * b]
            buf = buf[self.batch_size :]


def mixed_precision_mode(setting: str) -> str:
    """Config value → accelerate's mode: ``auto`` is bf16 on CUDA and no autocast on CPU."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return "no" if setting == "fp32" else setting


def _forget_mixed_precision() -> None:
    """Let this run choose its own mixed precision. accelerate keeps the first Accelerator's
    settings for the life of the process and refuses another precision, so a second training
    in one process (a VAE in fp32, then an LDM in bf16) would fail. Only the accelerator-level
    state is dropped: the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, with a state file) as (step, path), oldest first."""
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


# Settings a run may change and still resume from its checkpoints: how long it trains, how
# often it checkpoints, samples and evaluates, and how many processes share the work.
RESUMABLE_CHANGES = frozenset({
    "max_steps", "checkpoint_every", "checkpoints_keep", "sample_every", "sample_steps", "eval_every",
    "eval_samples", "eval_encoder", "log_every", "num_workers", "memory_mb", "gpus", "models",
    "max_nonfinite_steps",
})


def resume_settings(s: TrainLoopSettings) -> dict:
    """The settings a checkpoint records, as JSON values."""
    return json.loads(json.dumps(asdict(s), default=str))


def changed_settings(saved: dict, s: TrainLoopSettings) -> dict[str, tuple]:
    """Settings (beyond RESUMABLE_CHANGES) whose value differs from a checkpoint's: key → (then, now).
    Only keys both know count: a setting added or removed by a newer histopipe changes nothing."""
    now = resume_settings(s)
    return {k: (saved[k], now[k]) for k in sorted(set(saved) & set(now))
            if k not in RESUMABLE_CHANGES and saved[k] != now[k]}


def _set_aside_stale_checkpoints(ckpt_dir: Path, s: TrainLoopSettings, name: str) -> None:
    """Checkpoints written under other settings (a config edit that reran the job) are moved to
    ``checkpoints.superseded-<time>`` beside them, not resumed from and not deleted."""
    done = complete_checkpoints(ckpt_dir)
    if not done:
        return
    state = json.loads((done[-1][1] / STATE_FILE).read_text())
    if "settings" not in state:  # written before checkpoints recorded their settings
        return
    changed = changed_settings(state["settings"], s)
    if not changed:
        return
    target = ckpt_dir.with_name(f"{ckpt_dir.name}.superseded-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(ckpt_dir, target)
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    log.warning("%s: the checkpoints in %s were written with other settings (%s%s); training starts afresh "
                "and they are kept in %s", name, ckpt_dir, shown, more, target)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class _EMAWeights:
    """Context manager: the model holds the EMA weights inside, its own weights after."""

    def __init__(self, ema: EMAModel | None, params: list[nn.Parameter]):
        self.ema, self.params = ema, params

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc: object) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)


def train(
    task: Task,
    dataset: Dataset,
    s: TrainLoopSettings,
    out_dir: str | Path,
    callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``task.model`` on ``dataset`` until ``s.max_steps`` optimizer steps.

    Writes ``out_dir/checkpoints/checkpoint-<step>/``, ``out_dir/logs/`` (TensorBoard),
    ``out_dir/samples/step-<step>.png`` and finally ``out_dir/model/`` (the export with EMA
    weights, atomically). ``callback(step, loss)`` runs after every optimizer step (and checkpoint).
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    _forget_mixed_precision()
    accelerator = Accelerator(
        # Without CUDA, processes started by torchrun only form a group (gloo) when told
        # they run on the CPU.
        cpu=in_launched_process() and not torch.cuda.is_available(),
        mixed_precision=mixed_precision_mode(s.mixed_precision),
        gradient_accumulation_steps=s.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        # The other processes wait in the next all-reduce while the main one evaluates or
        # writes a checkpoint; a process that dies ends the job through the launcher.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=60))],
    )
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(s.seed)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    task.to(accelerator.device, compute_dtype)
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise HistopipeError(f"{task.name}: nothing to train (all parameters are frozen)")
    # foreach: one fused update over all tensors instead of a Python loop per tensor (torch
    # picks it by default on CUDA only; on the CPU it halves the optimizer's share of a step).
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, foreach=True)
    # Stepped once per optimizer step in every process (not prepared: accelerate would step
    # it once per process), so its checkpointed state does not depend on the process count.
    lr_scheduler = get_scheduler(
        "cosine" if s.lr_schedule == "cosine" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=s.warmup_steps,
        num_training_steps=s.max_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = None
    if s.ema_decay > 0 and main:  # the weights are the same in every process: one EMA is enough
        ema = EMAModel(params, decay=s.ema_decay, foreach=True)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)  # saved and loaded by the main process only
    # One generator per process (accelerate saves registered objects from the main process
    # only, so each process checkpoints its own generator: see _save_checkpoint).
    gen = torch.Generator(device=accelerator.device).manual_seed(s.seed * 1000 + rank)

    step = 0
    if main and ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".checkpoint-*.partial"):
            shutil.rmtree(p, ignore_errors=True)  # left by a job killed while saving
        _set_aside_stale_checkpoints(ckpt_dir, s, task.name)
    accelerator.wait_for_everyone()
    done = complete_checkpoints(ckpt_dir)
    if done:
        step, path = done[-1]
        accelerator.load_state(str(path))
        _load_generator(gen, path, rank, s.seed, step)
        log.info("%s: resumed from %s (step %d, %d process(es))", task.name, path, step, world)
    if main:
        # Evaluations after the checkpoint we resume from are redone: drop their lines.
        _write_progress(out_dir, [r for r in read_progress(out_dir) if r["step"] <= step])
    result = TrainResult(step=step, resumed_from=step)

    sampler = StreamBatchSampler(len(dataset), s.batch_size, s.seed, start=step * s.grad_accum, rank=rank, world=world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=s.num_workers, pin_memory=accelerator.device.type == "cuda")
    batches = iter(loader)
    if main:
        accelerator.init_trackers(task.name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(s).items()})
        if world > 1:
            log.info("%s: %d processes, %d samples each of every global batch of %d", task.name, world, s.batch_size // world, s.batch_size)
    bar = tqdm(total=s.max_steps, initial=step, desc=task.name, disable=not main, dynamic_ncols=True)
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    nonfinite_run = 0  # consecutive steps with non-finite gradients
    while step < s.max_steps:
        micro_losses = []
        finite = True
        for _ in range(s.grad_accum):
            batch = _to_device(next(batches), accelerator.device)
            with accelerator.accumulate(model):
                loss = task.loss(model, batch, gen, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # The norm of the all-reduced gradients, the same in every process: an
                    # update with a NaN or inf in it is skipped everywhere alike (bf16 has no
                    # loss scaler to do this), so one bad batch cannot poison the weights.
                    norm = accelerator.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm > 0 else float("inf"))
                    finite = bool(torch.isfinite(torch.as_tensor(norm)).item())
                    if not finite:
                        optimizer.zero_grad(set_to_none=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach().float())
        lr_scheduler.step()
        step += 1
        maybe_crash(step, rank)
        if finite:
            nonfinite_run = 0
        else:
            nonfinite_run += 1
            result.skipped_steps.append(step)
            if main and (len(result.skipped_steps) <= 10 or len(result.skipped_steps) % 100 == 0):
                log.warning("%s: step %d: non-finite gradients (loss %s); its update is skipped (%d skipped so far)",
                            task.name, step, f"{torch.stack(micro_losses).mean().item():.4g}", len(result.skipped_steps))
            if nonfinite_run >= s.max_nonfinite_steps:
                done = complete_checkpoints(ckpt_dir)
                raise HistopipeError(
                    f"{task.name}: {nonfinite_run} optimizer steps in a row (steps {step - nonfinite_run + 1}-{step}) had "
                    f"non-finite gradients, so training stopped; the newest complete checkpoint is "
                    f"{done[-1][1] if done else 'none'}. Lower the learning rate (lr {s.lr:g}) or train in float32 "
                    f"(mixed_precision: 'no'; this run: {accelerator.mixed_precision})"
                )
        if ema is not None and finite:
            ema.step(params)
        loss_value = accelerator.reduce(torch.stack(micro_losses).mean(), "mean").item()
        result.losses.append(loss_value)
        result.step = step
        if step % s.log_every == 0 or step == s.max_steps:
            accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                             "skipped_steps": len(result.skipped_steps)}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % s.checkpoint_every == 0 or step == s.max_steps:
            _save_checkpoint(accelerator, task, unwrapped, ema, params, gen, ckpt_dir, step, s)
        if main and s.sample_every and step % s.sample_every == 0:
            _write_samples(accelerator, task, unwrapped, ema, params, out_dir, step)
        if main and s.eval_every and (step % s.eval_every == 0 or step == s.max_steps):
            _evaluate(accelerator, task, unwrapped, ema, params, out_dir, step)
        if callback is not None:
            callback(step, loss_value)
    bar.close()

    final = out_dir / MODEL_DIR
    if main:
        model.eval()
        with _EMAWeights(ema, params), atomic_path(final) as tmp:
            task.export(unwrapped, tmp)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.model_dir = final
    return result


def _generator_file(folder: Path, rank: int) -> Path:
    return folder / f"generator_{rank}.pt"


def _load_generator(gen: torch.Generator, folder: Path, rank: int, seed: int, step: int) -> None:
    path = _generator_file(folder, rank)
    if path.is_file():
        gen.set_state(torch.load(path, weights_only=True))
    else:  # resumed with more processes than saved: a fresh stream, still reproducible
        log.warning("%s: no generator state of process %d; reseeding it", folder, rank)
        gen.manual_seed(seed * 1000 + rank + 7919 * step)


def _save_checkpoint(accelerator, task, unwrapped, ema, params, gen, ckpt_dir: Path, step: int, s: TrainLoopSettings) -> None:
    keep = s.checkpoints_keep
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".checkpoint-{step}.partial"  # same name in every process
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(gen.get_state(), _generator_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        was_training = unwrapped.training
        unwrapped.eval()
        with _EMAWeights(ema, params):
            task.export(unwrapped, tmp / MODEL_DIR)
        unwrapped.train(was_training)
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, "settings": resume_settings(s)}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_progress(out_dir: str | Path) -> list[dict]:
    """The evaluations of a training work folder, oldest first (``[]`` when none)."""
    path = Path(out_dir) / PROGRESS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_progress(out_dir: Path, records: list[dict]) -> None:
    if records or (out_dir / PROGRESS_FILE).exists():
        atomic_write_text(out_dir / PROGRESS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def _evaluate(accelerator, task, unwrapped, ema, params, out_dir: Path, step: int) -> None:
    evaluate = getattr(task, "evaluate", None)
    if evaluate is None:
        return
    was_training = unwrapped.training
    unwrapped.eval()
    t0 = time.perf_counter()
    try:
        with _EMAWeights(ema, params), torch.no_grad():
            metrics = evaluate(unwrapped, step)
    except Exception as err:  # a progress metric must never end a long run
        log.warning("%s step %d: progress evaluation failed (%s: %s); training goes on", task.name, step, type(err).__name__, err,
                    exc_info=True)
        metrics = {}
    finally:
        unwrapped.train(was_training)
    if not metrics:
        return
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    record = {"step": step, **metrics, "seconds": round(time.perf_counter() - t0, 2)}
    _write_progress(out_dir, [*read_progress(out_dir), record])
    log.info("%s step %d: %s", task.name, step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def _write_samples(accelerator, task, unwrapped, ema, params, out_dir: Path, step: int) -> None:
    from PIL import Image

    was_training = unwrapped.training
    unwrapped.eval()
    with _EMAWeights(ema, params), torch.no_grad():
        grid = task.sample_grid(unwrapped)
    unwrapped.train(was_training)
    if grid is None:
        return
    path = out_dir / "samples" / f"step-{step:07d}.png"
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("samples", grid, step, dataformats="HWC")
