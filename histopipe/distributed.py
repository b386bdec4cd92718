"""Several processes on one node: one per GPU (or, without CUDA, CPU processes on gloo).

A training or synthesis command whose config asks for ``gpus: N > 1`` starts itself again
under ``torchrun`` (``python -m torch.distributed.run --standalone --nproc-per-node N -m
histopipe <same arguments>``) and returns its exit status. ``torchrun`` ends every process
as soon as one fails, so a crashed process takes the job down instead of leaving the others
waiting in a collective; the rerun resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import timedelta

from histopipe.errors import ConfigError

log = logging.getLogger(__name__)

# Test hook: "STEP:RANK" makes process RANK exit hard after optimizer step STEP, as a
# process killed by the system would (tests of the crash and resume path).
CRASH_ENV = "HISTOPIPE_CRASH_AT"


def in_launched_process() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if in_launched_process() else 1


def per_process_batch(batch_size: int, processes: int, key: str) -> int:
    """The micro-batch of each process: the configured (global) batch over the processes."""
    if processes < 1:
        raise ConfigError(f"config.{key}.gpus: must be at least 1 (got {processes})")
    if batch_size % processes:
        raise ConfigError(
            f"config.{key}.batch_size={batch_size} is the global batch and must divide by the "
            f"{processes} processes of {key}.gpus={processes}"
        )
    return batch_size // processes


def check_node_gpus(gpus: int, key: str) -> None:
    """On a machine with CUDA, refuse to start more GPU processes than it has GPUs."""
    import torch

    if gpus > 1 and torch.cuda.is_available():
        have = torch.cuda.device_count()
        if gpus > have:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise ConfigError(f"config.{key}.gpus={gpus} but this node has {have} GPU(s){where}")


def launch_command(processes: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs ``histopipe <argv>`` in ``processes`` processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        "-m", "histopipe", *argv,
    ]


def relaunch(processes: int, argv: list[str] | None, batch_size: int | None, key: str) -> int | None:
    """Start ``histopipe <argv>`` in ``processes`` processes and return its exit status.

    ``None`` when this process should do the work itself: one process asked for, or already
    one of the launched ones. Bad requests (a global batch that does not divide, more GPUs
    than the node has) fail here, before any process starts.
    """
    if batch_size is not None:
        per_process_batch(batch_size, processes, key)
    if in_launched_process():
        if world_size() != processes:
            log.info("%s: %d processes (config asks for %d)", key, world_size(), processes)
        return None
    if processes == 1:
        return None
    check_node_gpus(processes, key)
    if argv is None:
        raise ConfigError(f"config.{key}.gpus={processes}: run this command from the command line to start several processes")
    import torch

    if not torch.cuda.is_available():
        log.warning("%s: no CUDA device; running %d CPU processes (gloo)", key, processes)
    cmd = launch_command(processes, argv)
    log.info("starting %d processes: %s", processes, " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def maybe_crash(step: int, rank: int) -> None:
    """The ``HISTOPIPE_CRASH_AT`` test hook (see above)."""
    spec = os.environ.get(CRASH_ENV)
    if spec and spec == f"{step}:{rank}":
        log.error("%s=%s: process %d exits at step %d", CRASH_ENV, spec, rank, step)
        os._exit(17)


def process_group() -> tuple[int, int]:
    """(rank, world) of this process, joining the launched processes' group (gloo: it only
    carries barriers; the work itself needs no collectives) when there is one."""
    if not in_launched_process():
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        # Long: a barrier waits for the slowest process's share of the work.
        dist.init_process_group("gloo", timeout=timedelta(hours=6))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every launched process (nothing to wait for in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_device(device):
    """The GPU of this process (``cuda:LOCAL_RANK``) when launched on CUDA, else ``device``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and in_launched_process():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
