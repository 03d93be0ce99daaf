"""Fixtures for the end-to-end tests: a real two-node SLURM cluster.

The ``slurm_cluster`` fixture (session scope) starts the private cluster with
``tests/e2e/cluster/slurm-up.sh`` and always stops it with ``slurm-down.sh``.
It needs root and Debian's SLURM/munge/MariaDB packages
(``tests/e2e/cluster/system-deps.sh``); without them the tests are skipped,
unless ``FLASHNET_REQUIRE_SLURM=1`` turns that into a failure (CI must not
silently skip the cluster tests).

Other knobs: ``FLASHNET_SLURM_DIR`` (state dir, default /tmp/flashnet-slurm),
``FLASHNET_SLURM_KEEP=1`` (leave the cluster up after the session).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLUSTER_SCRIPTS = Path(__file__).resolve().parent / "cluster"

REQUIRED_BINARIES = (
    "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr", "sinfo",
    "scontrol", "munged", "mariadbd", "ip", "nsenter", "unshare",
)

# Variables a surrounding SLURM job (or a user's shell) may have set; they
# would make sbatch/srun/submitit think they run inside a foreign allocation.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")

# Job states after which a job will not change any more (unless requeued).
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT",
})
USABLE_NODE_STATES = frozenset({"idle", "mix", "alloc"})

SACCT_FIELDS = ("JobID", "JobName", "State", "NodeList", "ExitCode", "Account",
                "Partition", "Start", "End")


class CommandError(RuntimeError):
    """A cluster command failed; the message carries its output."""


def _read_env_sh(path: Path) -> dict[str, str]:
    """The variables env.sh exports (it only contains ``export K=V`` lines)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            words = shlex.split(value)
            env[key] = words[0] if words else ""
    return env


def _run_script(name: str, *args: str, env: dict[str, str] | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPTS / name), *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def _describe(proc: subprocess.CompletedProcess) -> str:
    cmd = proc.args if isinstance(proc.args, str) else shlex.join(map(str, proc.args))
    return (f"`{cmd}` exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")


@dataclass
class SlurmCluster:
    """Handle on the running test cluster.

    ``env`` is the complete environment to give subprocesses (os.environ
    without foreign SLURM_* variables, plus ``cluster_env``, with this
    interpreter's bin dir first on PATH so jobs find the same python and
    snakemake); ``cluster_env`` is only what env.sh exports (SLURM_CONF and
    the FLASHNET_SLURM_* descriptors).
    """

    state_dir: Path
    log_dir: Path
    env: dict[str, str]
    cluster_env: dict[str, str]
    nodes: list[str]
    partition: str
    account: str
    cluster_name: str
    node_ifname: str
    _removed_env: tuple[str, ...] = field(default=(), repr=False)

    # ------------------------------------------------------------ commands
    def run(self, cmd: str | list[str], *, check: bool = True, timeout: float = 120,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a command (a string goes through bash) with the cluster env."""
        shell_cmd = ["bash", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
        env = dict(self.env, **kwargs.pop("env", {}))
        proc = subprocess.run(shell_cmd, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False, **kwargs)
        if isinstance(cmd, str):
            proc.args = cmd
        if check and proc.returncode != 0:
            raise CommandError(_describe(proc))
        return proc

    def apply_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process's os.environ at the cluster, for libraries that
        call sbatch/sacct themselves with the inherited environment
        (submitit)."""
        for key in self._removed_env:
            monkeypatch.delenv(key, raising=False)
        for key, value in self.cluster_env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("PATH", self.env["PATH"])

    def sbatch(self, *args: str) -> str:
        """Submit with sbatch --parsable; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args]).stdout.strip()
        return out.split(";")[0]

    # ---------------------------------------------------------------- jobs
    def sacct(self, job_id: str | int, *, duplicates: bool = False) -> list[dict]:
        """sacct rows for a job (the job itself, then its steps).

        Keys: JobID, JobName, State, NodeList, ExitCode, Account, Partition,
        Start, End, and Restarts (how often slurmctld requeued the job, from
        scontrol since sacct has no such field; None once the controller has
        forgotten the job). ``duplicates=True`` (sacct -D) also returns the
        records of earlier runs of a requeued job, oldest first.
        """
        cmd = ["sacct", "-j", str(job_id), "-n", "-P", "-o", ",".join(SACCT_FIELDS)]
        if duplicates:
            cmd.append("-D")
        rows = [dict(zip(SACCT_FIELDS, line.split("|")))
                for line in self.run(cmd).stdout.splitlines() if line.strip()]
        restarts = self.job_info(job_id).get("Restarts")
        for row in rows:
            row["Restarts"] = int(restarts) if restarts is not None else None
        return rows

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} if the controller does not
        know the job)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        info = {}
        for word in proc.stdout.split():
            key, sep, value = word.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def job_state(self, job_id: str | int) -> str | None:
        """Current state of the job's latest run per sacct (e.g. RUNNING)."""
        main = [r for r in self.sacct(job_id) if r["JobID"] == str(job_id)]
        return main[-1]["State"].split()[0] if main else None

    def wait_job(self, job_id: str | int, states=TERMINAL_STATES, timeout: float = 120) -> str:
        """Poll sacct until the job reaches one of ``states``; returns it."""
        return self._wait_for_state(lambda: self.job_state(job_id), states, timeout, f"job {job_id}")

    def _wait_for_state(self, current, states, timeout: float, what: str) -> str:
        """Poll ``current()`` until it returns one of ``states``; time out with slurmctld's log."""
        states = frozenset(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = current()
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"{what} still {state} after {timeout}s "
                           f"(wanted {sorted(states)})\n{self.log_tail('slurmctld.log')}")

    # --------------------------------------------------------------- nodes
    def node_state(self, name: str) -> str:
        """sinfo's short state, e.g. idle, mix, alloc, down*, idle* (the
        asterisk: slurmctld gets no answer from the node)."""
        return self.run(["sinfo", "-h", "-N", "-n", name, "-o", "%t"]).stdout.split()[0]

    def wait_node_state(self, name: str, states, timeout: float = 90) -> str:
        return self._wait_for_state(lambda: self.node_state(name), states, timeout, f"node {name}")

    def node_pids(self, name: str) -> list[int]:
        """Processes inside the node's network namespace (slurmd, steps, jobs)."""
        out = self.run(["ip", "netns", "pids", name]).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, name: str) -> None:
        """Lose a node: SIGKILL every process in its network namespace,
        slurmd included. slurmctld notices after roughly 2-3x SlurmdTimeout
        (about 25 s here), then sets it DOWN and requeues its batch jobs."""
        self._check_node(name)
        self.run(["bash", str(CLUSTER_SCRIPTS / "slurm-node.sh"), "kill", name])

    def restart_node(self, name: str, timeout: float = 60) -> None:
        """Start the node's slurmd again and wait until slurmctld has seen
        it register and the node is usable (idle/mix/alloc)."""
        self._check_node(name)
        script = str(CLUSTER_SCRIPTS / "slurm-node.sh")
        self.run(["bash", script, "start", name])
        self.run(["bash", script, "wait", name, str(int(timeout))], timeout=timeout + 30)

    def _check_node(self, name: str) -> None:
        if name not in self.nodes:
            raise ValueError(f"unknown node {name!r}; nodes are {self.nodes}")

    # ---------------------------------------------------------------- logs
    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / name
        if not path.exists():
            return f"(no {path})"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- tail of {path} ---\n" + "\n".join(text)


CLUSTER_DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")


def machine_state() -> dict[str, object]:
    """What the cluster scripts touch and must leave as they found it."""
    def lines(*cmd: str) -> list[str]:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        return sorted(line.strip() for line in out.splitlines() if line.strip())

    return {
        "/etc/hosts": Path("/etc/hosts").read_bytes(),
        "network interfaces": [line.split(":")[1].split("@")[0].strip() for line in lines("ip", "-o", "link")],
        "network namespaces": lines("ip", "netns", "list"),
        "/run/netns exists": Path("/run/netns").exists(),
        "daemons": {name: [pid for pid in lines("pgrep", "-x", name) if _alive(pid)] for name in CLUSTER_DAEMONS},
    }


def _alive(pid: str) -> bool:
    """Running, not a zombie: this machine's init reaps the stopped daemons some seconds late."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("FLASHNET_REQUIRE_SLURM") == "1":
        pytest.fail(f"FLASHNET_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(request, tmp_path_factory):
    if os.geteuid() != 0:
        _skip_or_fail("the SLURM test cluster needs root (namespaces, daemons, /etc/hosts)")
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        _skip_or_fail(f"SLURM test cluster binaries missing: {', '.join(missing)} "
                      "(run tests/e2e/cluster/system-deps.sh as root)")

    # The scripts get a clean environment: a foreign SLURM_CONF must not make
    # them talk to another cluster.
    script_env = {k: v for k, v in os.environ.items()
                  if not k.startswith(_FOREIGN_ENV_PREFIXES)}
    state_dir = Path(os.environ.get("FLASHNET_SLURM_DIR", "/tmp/flashnet-slurm"))
    script_env["FLASHNET_SLURM_DIR"] = str(state_dir)

    # A cluster left up on purpose (FLASHNET_SLURM_KEEP=1) by an earlier session is not "as found".
    before = None if (state_dir / "env.sh").exists() else machine_state()

    def down() -> None:
        if os.environ.get("FLASHNET_SLURM_KEEP") == "1":
            print(f"\nFLASHNET_SLURM_KEEP=1: leaving the cluster in {state_dir} up")
            return
        proc = _run_script("slurm-down.sh", env=script_env)
        assert proc.returncode == 0, f"slurm-down.sh failed\n{_describe(proc)}"
        assert not state_dir.exists(), f"slurm-down.sh left {state_dir}"
        if before is not None:
            after = machine_state()
            changed = [key for key in before if before[key] != after[key]]
            assert not changed, "the cluster scripts did not leave the machine as they found it: " + "; ".join(
                f"{key}: {before[key]!r} -> {after[key]!r}" for key in changed)

    try:
        t0 = time.monotonic()
        proc = _run_script("slurm-up.sh", env=script_env)
        if proc.returncode != 0:
            pytest.fail(f"slurm-up.sh failed\n{_describe(proc)}", pytrace=False)
        print(f"\nslurm-up.sh took {time.monotonic() - t0:.1f}s")
        # Run twice, it finds its healthy cluster and keeps it.
        again = _run_script("slurm-up.sh", env=script_env)
        if again.returncode != 0:
            pytest.fail(f"slurm-up.sh failed when run a second time\n{_describe(again)}", pytrace=False)

        cluster_env = _read_env_sh(state_dir / "env.sh")
        removed = tuple(k for k in os.environ
                        if k.startswith(_FOREIGN_ENV_PREFIXES) and k not in cluster_env)
        env = {k: v for k, v in os.environ.items() if k not in removed}
        env.update(cluster_env)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cluster = SlurmCluster(
            state_dir=state_dir,
            log_dir=state_dir / "log",
            env=env,
            cluster_env=cluster_env,
            nodes=cluster_env["FLASHNET_SLURM_NODES"].split(),
            partition=cluster_env["FLASHNET_SLURM_PARTITION"],
            account=cluster_env["FLASHNET_SLURM_ACCOUNT"],
            cluster_name=cluster_env["FLASHNET_SLURM_CLUSTER"],
            node_ifname=cluster_env["FLASHNET_SLURM_NODE_IFNAME"],
            _removed_env=removed,
        )
        yield cluster
    finally:
        # Daemon logs vanish with the state dir; keep them when tests failed.
        if request.session.testsfailed and (state_dir / "log").is_dir():
            keep = tmp_path_factory.mktemp("slurm-logs")
            shutil.copytree(state_dir / "log", keep, dirs_exist_ok=True)
            print(f"\nSLURM daemon logs copied to {keep}", file=sys.stderr)
        down()
