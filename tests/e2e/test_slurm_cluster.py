"""Smoke tests of the e2e SLURM cluster itself (tests/e2e/cluster/).

They check the properties the pipeline tests build on: two idle nodes,
accounting through sacct, multi-node torch.distributed via submitit,
Snakemake's slurm executor, and losing and regaining a node.
"""

from __future__ import annotations

import re
import textwrap
import time

import pytest

pytestmark = pytest.mark.e2e


def _eventually(fetch, ok, timeout=20.0):
    """Poll fetch() until ok(value); returns the last value either way, so
    the caller's asserts show what was seen. Accounting records reach
    slurmdbd asynchronously, a few seconds after the controller's view."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_both_nodes_idle(slurm_cluster):
    out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N|%t|%c|%P"]).stdout
    rows = [line.split("|") for line in out.splitlines()]
    assert sorted(r[0] for r in rows) == sorted(slurm_cluster.nodes)
    assert len(slurm_cluster.nodes) == 2
    for name, state, cpus, partition in rows:
        assert state == "idle", f"{name} is {state}"
        assert cpus == "2"
        assert partition == f"{slurm_cluster.partition}*"  # * = default partition


def test_sacct_reports_finished_job(slurm_cluster, tmp_path):
    job_id = slurm_cluster.sbatch("--job-name=smoke", f"--output={tmp_path}/%j.out",
                                  "--wrap", "hostname")
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED"

    # slurmctld registers new jobs with slurmdbd from a periodic background
    # thread, after their steps may already be recorded; until then sacct
    # shows a stand-in row (JobName "allocation", no partition, PENDING).
    rows = _eventually(lambda: slurm_cluster.sacct(job_id),
                       lambda rows: any(r["JobName"] == "smoke" for r in rows))
    main = [r for r in rows if r["JobID"] == job_id]
    assert len(main) == 1
    assert main[0]["JobName"] == "smoke"
    assert main[0]["State"] == "COMPLETED"
    assert main[0]["ExitCode"] == "0:0"
    assert main[0]["NodeList"] in slurm_cluster.nodes
    assert main[0]["Account"] == slurm_cluster.account
    assert main[0]["Partition"] == slurm_cluster.partition
    assert main[0]["Restarts"] == 0
    assert any(r["JobID"] == f"{job_id}.batch" for r in rows)
    assert (tmp_path / f"{job_id}.out").read_text().strip() == main[0]["NodeList"]


def test_submitit_two_node_gloo_allreduce(slurm_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    # submitit runs sbatch/sacct with this process's environment.
    slurm_cluster.apply_env(monkeypatch)

    # Defined inside the test so cloudpickle ships it by value: the job's
    # interpreter cannot import this test module.
    def allreduce():
        import socket

        import submitit
        import torch
        import torch.distributed as dist

        env = submitit.helpers.TorchDistributedEnvironment().export()
        dist.init_process_group("gloo")
        try:
            value = torch.tensor([float(env.rank + 1)])
            dist.all_reduce(value)
            return {"rank": env.rank, "world_size": env.world_size,
                    "host": socket.gethostname(), "master": env.master_addr,
                    "sum": value.item()}
        finally:
            dist.destroy_process_group()

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        nodes=2, tasks_per_node=1, cpus_per_task=1, mem_gb=1, timeout_min=10,
        slurm_partition=slurm_cluster.partition, slurm_account=slurm_cluster.account,
        name="gloo-allreduce",
    )
    job = executor.submit(allreduce)
    try:
        results = job.results()  # one per task
    except Exception:
        print(job.stdout(), job.stderr(), sep="\n")
        raise

    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 for r in results)
    assert all(r["sum"] == 3.0 for r in results)  # 1 + 2
    assert sorted(r["host"] for r in results) == sorted(slurm_cluster.nodes)
    assert {r["master"] for r in results} == {slurm_cluster.nodes[0]}
    assert slurm_cluster.wait_job(job.job_id, timeout=30) == "COMPLETED"


def test_snakemake_slurm_executor(slurm_cluster, tmp_path):
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(textwrap.dedent("""\
        rule summarize:
            input: "numbers.txt"
            output: "total.txt"
            shell: "awk '{{s += $1}} END {{print s}}' {input} > {output}; hostname >> {output}"

        rule numbers:
            output: "numbers.txt"
            shell: "seq 1 10 > {output}; hostname > host-numbers.txt"
        """))
    proc = slurm_cluster.run(
        [
            "snakemake", "--executor", "slurm", "--jobs", "2",
            "--directory", str(workdir), "--snakefile", str(workdir / "Snakefile"),
            "--default-resources", f"slurm_partition='{slurm_cluster.partition}'",
            f"slurm_account='{slurm_cluster.account}'", "mem_mb=500", "runtime=10",
            "--slurm-init-seconds-before-status-checks", "2",
            "--latency-wait", "10", "--printshellcmds",
        ],
        check=False, timeout=600,
    )
    assert proc.returncode == 0, f"snakemake failed\n{proc.stdout}\n{proc.stderr}"

    total, host = (workdir / "total.txt").read_text().split()
    assert total == "55"
    assert host in slurm_cluster.nodes
    assert (workdir / "host-numbers.txt").read_text().strip() in slurm_cluster.nodes

    # Both rules ran as SLURM jobs (not locally) and finished cleanly.
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", proc.stdout + proc.stderr)
    assert len(job_ids) == 2, proc.stderr
    for job_id in job_ids:
        assert slurm_cluster.wait_job(job_id, timeout=30) == "COMPLETED"


def test_kill_and_restart_node(slurm_cluster, tmp_path):
    victim = slurm_cluster.nodes[1]
    job_id = slurm_cluster.sbatch(f"--nodelist={victim}", f"--output={tmp_path}/%j.out",
                                  "--wrap", "sleep 600")
    slurm_cluster.wait_job(job_id, states={"RUNNING"}, timeout=30)

    slurm_cluster.kill_node(victim)
    assert slurm_cluster.node_pids(victim) == []

    # slurmctld needs a few missed pings (SlurmdTimeout=10) to give up on it.
    assert slurm_cluster.wait_node_state(victim, {"down*"}, timeout=90) == "down*"
    # With JobRequeue=1 the batch job is requeued: the controller puts it
    # back to PENDING (it waits for its node), and accounting records the
    # lost run as NODE_FAIL (the new run's record follows a few s later).
    info = _eventually(lambda: slurm_cluster.job_info(job_id),
                       lambda i: i.get("JobState") == "PENDING")
    assert info["Restarts"] == "1"
    runs = _eventually(
        lambda: [r for r in slurm_cluster.sacct(job_id, duplicates=True) if r["JobID"] == job_id],
        lambda rows: rows and rows[0]["State"] == "NODE_FAIL")
    assert runs[0]["NodeList"] == victim
    assert runs[0]["Restarts"] == 1
    slurm_cluster.run(["scancel", job_id])

    slurm_cluster.restart_node(victim)
    assert slurm_cluster.wait_node_state(victim, {"idle"}, timeout=30) == "idle"
    assert slurm_cluster.node_state(slurm_cluster.nodes[0]) == "idle"
    # And it takes work again.
    check = slurm_cluster.sbatch(f"--nodelist={victim}", f"--output={tmp_path}/%j.out",
                                 "--wrap", "hostname")
    assert slurm_cluster.wait_job(check, timeout=60) == "COMPLETED"
    assert (tmp_path / f"{check}.out").read_text().strip() == victim
