"""A real single-node SLURM cluster (munged, slurmctld, slurmd) for tests.

Used by the ``slurm_cluster`` fixture in ``tests/test_slurm.py``. The cluster runs on this
machine from Debian's packages, with its configuration, state and logs in a temporary
directory. Facts it relies on (see the project's SLURM notes):

- the job-step plugin strips ``SLURM_CONF`` before its inner ``srun``, so the configuration
  must be visible at ``/etc/slurm/slurm.conf``; we symlink ours there and restore whatever
  was there before;
- a fake GPU (``File=/dev/null`` in gres.conf) lets GPU rules be scheduled on a GPU-less
  node without the node draining;
- ``EnforcePartLimits=ALL`` makes impossible requests fail at submit time instead of
  pending forever;
- the job-completion log (``jobcomp/filetxt``) records every finished job, which is how a
  test proves that work really went through SLURM.

Every wait is bounded and every failure raises :class:`ClusterError` with the log lines
that explain it. Only processes started here are stopped, by PID. A lock file serialises
clusters of concurrent test runs on one machine (they would share ports and /etc/slurm);
a state file lets the next run clean up after a run that was killed before its teardown.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sinfo", "sbatch", "squeue", "scancel", "scontrol", "srun", "munge")
ETC_SLURM = Path("/etc/slurm")
CONF_NAMES = ("slurm.conf", "gres.conf")
LOCK_PATH = Path("/tmp/histopipe-slurm-cluster.lock")
STATE_PATH = Path("/tmp/histopipe-slurm-cluster.json")
BACKUP_SUFFIX = ".histopipe-backup"
# Memory left to the OS and to processes outside SLURM, MiB.
MEMORY_MARGIN_MB = 2048


class ClusterError(RuntimeError):
    """The cluster could not be installed, started or used; the message says why."""


def unsupported_reason() -> str | None:
    """Why this machine cannot host the test cluster (not root, not Debian), or None."""
    if os.geteuid() != 0:
        return "starting a SLURM cluster needs root (daemons, /etc/slurm, apt-get)"
    os_release = Path("/etc/os-release")
    text = os_release.read_text() if os_release.exists() else ""
    if not re.search(r"^ID=\"?debian\"?$", text, re.MULTILINE) or shutil.which("apt-get") is None:
        return "the test cluster is installed from Debian packages; this is not Debian"
    return None


def run_bounded(
    cmd: Sequence[str], timeout: float, *, env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None, check: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill that group and raise.

    ``subprocess.run(timeout=...)`` kills only the direct child; a ``snakemake`` or
    ``apt-get`` leaves grandchildren behind, so the whole group it created goes.
    """
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=cwd, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise ClusterError(
            f"{' '.join(cmd[:3])} ... did not finish within {timeout:.0f} s; output tail:\n"
            f"{_tail(out)}"
        ) from None
    result = subprocess.CompletedProcess(list(cmd), proc.returncode, out, None)
    if check and result.returncode != 0:
        raise ClusterError(
            f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{_tail(out)}"
        )
    return result


def _tail(text: str | None, lines: int = 40) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def ensure_packages(timeout: float = 420.0) -> None:
    """Install the SLURM and munge Debian packages unless their programs are present."""
    missing = [p for p in DAEMONS.values() if not Path(p).exists()]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if not missing:
        return
    deadline = time.monotonic() + timeout
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_bounded(["apt-get", "update"], max(deadline - time.monotonic(), 1), env=env, check=True)
    run_bounded(
        ["apt-get", "-o", "DPkg::Lock::Timeout=120", "install", "-y", "--no-install-recommends", *PACKAGES],
        max(deadline - time.monotonic(), 1), env=env, check=True,
    )
    still = [p for p in DAEMONS.values() if not Path(p).exists()]
    still += [c for c in CLIENTS if shutil.which(c) is None]
    if still:
        raise ClusterError(f"after apt-get install, still missing: {', '.join(still)}")


def node_memory_mb() -> int:
    """Memory SLURM may hand out on this node, MiB: MemTotal minus a margin."""
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE).group(1))
    return max(total_kb // 1024 - MEMORY_MARGIN_MB, 1024)


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int) -> str:
    """slurm.conf for one node ``host`` with ``cpus`` cores, ``memory_mb`` MiB and one fake GPU."""
    return f"""\
ClusterName=histopipe-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state/ctld
SlurmdSpoolDir={root}/state/d
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct cannot work, so clients must use squeue (see MinJobAge).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Finished jobs stay visible to squeue (the status command) and scontrol this long, s.
MinJobAge=1800
ReturnToService=2
MpiDefault=none
# Refuse impossible requests at submit time; otherwise they pend forever.
EnforcePartLimits=ALL
DefMemPerCPU=500
GresTypes=gpu
NodeName={host} CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def gres_conf(host: str) -> str:
    """gres.conf with one fake GPU; /dev/null keeps slurmd from draining the node."""
    return f"AutoDetect=off\nNodeName={host} Name=gpu File=/dev/null\n"


@dataclass
class JobRecord:
    """One line of the job-completion log: a finished SLURM job."""

    job_id: int
    state: str
    fields: dict[str, str]

    @property
    def tres(self) -> dict[str, str]:
        """Trackable resources the job held, e.g. {"cpu": "2", "mem": "1000M", "gres/gpu": "1"}."""
        items = (kv.split("=", 1) for kv in self.fields.get("Tres", "").split(",") if "=" in kv)
        return dict(items)


def parse_jobcomp(text: str) -> list[JobRecord]:
    """Parse ``jobcomp/filetxt`` lines (``Key=value`` pairs separated by spaces)."""
    records = []
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            records.append(JobRecord(int(fields["JobId"]), fields.get("JobState", ""), fields))
    return records


@dataclass
class _Started:
    name: str
    pid: int
    starttime: str


def _proc_starttime(pid: int) -> str | None:
    """Kernel start time of ``pid`` (clock ticks since boot), None if it is gone.

    A zombie counts as gone: it has exited, and in a container whose init does not reap
    orphans it would otherwise look alive forever.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in task.read_text().split()]
    return found


def _running(names: Sequence[str]) -> dict[int, str]:
    """PIDs of processes whose command name is one of ``names``."""
    found = {}
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            name = comm.read_text().strip()
            if name in names:
                found[int(comm.parent.name)] = name
    return found


@dataclass
class SlurmCluster:
    """A single-node SLURM cluster rooted in ``root``; use :meth:`start` / :meth:`stop`."""

    root: Path
    host: str = field(default_factory=socket.gethostname)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    memory_mb: int = field(default_factory=node_memory_mb)
    _started: list[_Started] = field(default_factory=list)
    _linked: list[str] = field(default_factory=list)
    _created_etc: bool = False
    _lock: object | None = None

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def jobcomp_log(self) -> Path:
        return self.root / "log" / "jobcomp.log"

    def log_tails(self) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log} ---\n{_tail(log.read_text(errors='replace'), 25)}")
        return "\n".join(parts)

    def jobs(self) -> list[JobRecord]:
        """Finished jobs from the job-completion log."""
        if not self.jobcomp_log.exists():
            return []
        return parse_jobcomp(self.jobcomp_log.read_text())

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, lock_timeout: float = 300.0, ready_timeout: float = 60.0) -> None:
        """Install if needed, configure, start the daemons, wait until the node is idle."""
        self._acquire_lock(lock_timeout)
        try:
            _cleanup_stale_run()
            ensure_packages()
            others = _running(("slurmctld", "slurmd"))
            if others:
                raise ClusterError(
                    "SLURM daemons not started by this test are running "
                    f"({', '.join(f'{n} pid {p}' for p, n in others.items())}); "
                    "stop them before running the SLURM test"
                )
            self._write_config()
            self._link_config()
            self._start_munge(ready_timeout)
            for name in ("slurmctld", "slurmd"):
                self._spawn(name, [DAEMONS[name], "-D", "-f", str(self.conf)])
            self._wait_idle(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 15.0) -> None:
        """Cancel leftover jobs, stop the daemons started here, restore /etc/slurm."""
        try:
            if any(s.name == "slurmctld" for s in self._started) and shutil.which("scancel"):
                with contextlib.suppress(ClusterError):
                    run_bounded(["scancel", "--full", "--user=root"], 10)
            # slurmd and slurmctld first, munged (their authentication) last.
            for started in sorted(self._started, key=lambda s: s.name == "munged"):
                _terminate(started, grace)
            self._started.clear()
            self._write_state()
            _restore_config(self._linked, self._created_etc)
            self._linked.clear()
            STATE_PATH.unlink(missing_ok=True)
        finally:
            self._release_lock()

    # -- steps -------------------------------------------------------------------------

    def _acquire_lock(self, timeout: float) -> None:
        handle = open(LOCK_PATH, "a+")  # held until stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise ClusterError(
                        f"another test run holds {LOCK_PATH} (its SLURM cluster) for more "
                        f"than {timeout:.0f} s"
                    ) from None
                time.sleep(1)
        self._lock = handle

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _write_config(self) -> None:
        for sub in ("etc", "state/ctld", "state/d", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.root, self.host, self.cpus, self.memory_mb))
        (self.root / "etc" / "gres.conf").write_text(gres_conf(self.host))

    def _link_config(self) -> None:
        if not ETC_SLURM.exists():
            ETC_SLURM.mkdir(parents=True)
            self._created_etc = True
        for name in CONF_NAMES:
            target = ETC_SLURM / name
            if target.exists() or target.is_symlink():
                target.rename(target.with_name(name + BACKUP_SUFFIX))
            target.symlink_to(self.root / "etc" / name)
            self._linked.append(name)
            self._write_state()

    def _start_munge(self, timeout: float) -> None:
        if run_bounded(["munge", "-n"], 10).returncode == 0:
            return  # a munged is already serving this machine; use it, leave it alone
        subprocess.run(
            ["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"],
            check=True, timeout=10,
        )
        self._spawn("munged", ["runuser", "-u", "munge", "--", DAEMONS["munged"], "-F"])
        self._wait("munged to accept credentials", timeout,
                   lambda: run_bounded(["munge", "-n"], 10).returncode == 0)
        # runuser passes SIGTERM on to munged, but returns before munged has exited;
        # track munged itself too, so stop() waits for it.
        runuser = self._started[-1].pid
        for child in _children(runuser):
            self._started.append(_Started("munged", child, _proc_starttime(child) or ""))
        self._write_state()

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout.log", "ab")
        with log:
            # A new session (setsid): the daemons do not get the test's terminal signals.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._started.append(_Started(name, proc.pid, _proc_starttime(proc.pid) or ""))
        self._write_state()

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            for started in self._started:
                if _proc_starttime(started.pid) is None:
                    raise ClusterError(f"{started.name} exited during start-up:\n{self.log_tails()}")
            out = run_bounded(["sinfo", "-h", "-o", "%t"], 10)
            state = out.stdout.strip()
            if state.startswith("drain"):
                run_bounded(["scontrol", "update", f"nodename={self.host}", "state=resume"], 10)
            return out.returncode == 0 and state == "idle"

        self._wait("the SLURM node to become idle", timeout, idle)

    def _wait(self, what: str, timeout: float, ready) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                   f"{self.log_tails()}")
            time.sleep(0.5)

    def _write_state(self) -> None:
        state = {
            "root": str(self.root),
            "started": [vars(s) for s in self._started],
            "linked": self._linked,
            "created_etc": self._created_etc,
        }
        STATE_PATH.write_text(json.dumps(state))


def _terminate(started: _Started, grace: float) -> None:
    """SIGTERM ``started`` if it is still the process we spawned; SIGKILL after ``grace``."""
    if _proc_starttime(started.pid) != started.starttime:
        return  # exited already (and the PID may have been reused)
    with contextlib.suppress(ProcessLookupError):
        os.kill(started.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _proc_starttime(started.pid) == started.starttime:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(started.pid, signal.SIGKILL)
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(started.pid, os.WNOHANG)  # reap, so the zombie does not look alive
        time.sleep(0.2)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(started.pid, 0)


def _restore_config(linked: Sequence[str], created_etc: bool) -> None:
    for name in linked:
        target = ETC_SLURM / name
        if target.is_symlink():
            target.unlink()
        backup = target.with_name(name + BACKUP_SUFFIX)
        if backup.exists() or backup.is_symlink():
            backup.rename(target)
    if created_etc:
        with contextlib.suppress(OSError):
            ETC_SLURM.rmdir()


def _cleanup_stale_run() -> None:
    """Undo a previous run that died before its teardown (daemons by PID, /etc/slurm)."""
    if not STATE_PATH.exists():
        return
    try:
        state = json.loads(STATE_PATH.read_text())
    except (OSError, ValueError):
        STATE_PATH.unlink(missing_ok=True)
        return
    for item in sorted(state.get("started", []), key=lambda s: s["name"] == "munged"):
        _terminate(_Started(**item), grace=10)
    _restore_config(state.get("linked", []), state.get("created_etc", False))
    STATE_PATH.unlink(missing_ok=True)


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Context manager: a started cluster in ``root``, stopped on exit."""
    cluster = SlurmCluster(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
