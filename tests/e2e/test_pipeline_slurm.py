"""The workflow on a real two-node SLURM cluster (the ``slurm_cluster`` fixture), run as the README
says: the profile installed as ``~/.config/snakemake/slurm`` and ``snakemake --profile slurm``.

Shard conversion runs as SLURM jobs through Snakemake's slurm executor; training is one 2-node DDP
job (one gloo process per node) submitted by submitit; evaluation is another submitit job. Then the
ways a long run gets interrupted: the USR2 signal SLURM sends before a time limit, ``scontrol
requeue`` (what preemption does), a node lost mid-training, and Snakemake itself killed.

HOME points at a temporary folder holding only the installed profile, so the real home is untouched.
"""

from __future__ import annotations

import re
import shutil
import signal

import pytest
import yaml

from helpers import (REPO, RUN, VENV_BIN, Workflow, check_report, check_run, check_shards, describe, different_tensors,
                     dry_run_jobs, expected_jobs, manifest, metrics, model_weights, progress_steps,
                     shard_identities, stop, summary, tiny_config, wait_for)

pytestmark = pytest.mark.e2e

# One process per node on both nodes, as a multi-node GPU run would be laid out.
CONFIG = tiny_config(nodes=2, devices_per_node=1)
# Test-only speed-ups, given on the command line rather than in the profile (a real site wants the
# plugin's default: a first status check 40 s after submitting).
FAST = ("--slurm-init-seconds-before-status-checks", "2")
PROFILE = ("--profile", "slurm")
MANIFESTS = tuple(f"results/shards/{split}/manifest.json" for split in ("train", "val"))
TRAINED = f"results/runs/{RUN}/summary.json"
# "Job 4 has been submitted with SLURM jobid 5 (log: .../slurm_logs/rule_write_shards/train_0/5.log)."
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/(?:(\w+)/)?\d+\.log\)")


@pytest.fixture(scope="module")
def slurm_env(slurm_cluster, tmp_path_factory) -> dict[str, str]:
    """The cluster's environment, with a HOME where the profile is installed as the README says:
    ``mkdir -p ~/.config/snakemake && cp -r profiles/slurm ~/.config/snakemake/slurm``."""
    home = tmp_path_factory.mktemp("home")
    (home / ".config" / "snakemake").mkdir(parents=True)
    shutil.copytree(REPO / "profiles" / "slurm", home / ".config" / "snakemake" / "slurm")
    env = dict(slurm_cluster.env, HOME=str(home))
    env.pop("XDG_CONFIG_HOME", None)
    return env


@pytest.fixture(scope="module")
def slurm_run(slurm_env, tmp_path_factory) -> Workflow:
    """The whole workflow, once, through `snakemake --profile slurm`; tests below read its outputs
    and reuse its data, and its run is the uninterrupted reference."""
    workflow = Workflow.create(tmp_path_factory.mktemp("slurm-pipeline"), CONFIG, slurm_env)
    proc = workflow.snakemake(*PROFILE, *FAST, timeout=1500)
    assert proc.returncode == 0, describe(proc)
    workflow.output = proc.stdout + proc.stderr
    return workflow


def job_id_in(text: str, pattern: str) -> str | None:
    found = re.search(pattern, text)
    return found.group(1) if found else None


def train_job_id(workflow: Workflow) -> str | None:
    return job_id_in(workflow.train_log(), r"submitted slurm job (\d+) for run")


def hostnames(slurm_cluster, node_list: str) -> list[str]:
    return slurm_cluster.run(["scontrol", "show", "hostnames", node_list]).stdout.split()


def allocations(slurm_cluster, job_id: str) -> list[dict]:
    """sacct's record of each run of the job (requeues included), oldest first."""
    return [r for r in slurm_cluster.sacct(job_id, duplicates=True) if r["JobID"] == job_id]


def latest_step(workflow: Workflow) -> int:
    return max(progress_steps(workflow.train_log()), default=0)


def stop_step(log: str) -> int | None:
    """The step at which the job checkpointed on a stop request ("stopped at step 14 (...)", or
    "stopped at the end of epoch 2 (...)" when the request fell on an epoch's last step)."""
    found = re.search(r"stopped at (?:step (\d+)|the end of epoch (\d+))", log)
    if found is None:
        return None
    step, epoch = found.groups()
    return int(step) if step else int(epoch) * steps_per_epoch()


def steps_per_epoch() -> int:
    sample = CONFIG["sample_data"]
    return sample["classes"] * sample["train_per_class"] // CONFIG["runs"][RUN]["batch_size"]


def reuse_shards(slurm_run: Workflow, slurm_env, path) -> Workflow:
    workflow = Workflow.create(path, CONFIG, slurm_env)
    workflow.copy_inputs_from(slurm_run, shards=True)
    return workflow


# --------------------------------------------------------------------------- the profiles


def test_slurm_profile_dry_run_lists_every_job(slurm_env, tmp_path):
    for profile in (str(REPO / "profiles" / "slurm"), "slurm"):  # by path, and installed
        workflow = Workflow.create(tmp_path / profile.replace("/", "_"), CONFIG, slurm_env)
        proc = workflow.snakemake("--profile", profile, "-n")
        assert proc.returncode == 0, describe(proc)
        assert f"Using profile {profile} " in proc.stdout + proc.stderr
        assert dry_run_jobs(proc.stdout) == expected_jobs(CONFIG)


# --------------------------------------------------------------------------- the whole workflow


def test_shard_jobs_ran_as_slurm_jobs(slurm_run, slurm_cluster):
    submitted = [(job_id, rule) for job_id, rule, _ in SUBMITTED.findall(slurm_run.output)]
    rules = sorted(rule for _, rule in submitted)
    assert rules == sorted(["sample_data", "manifest", "manifest", "index_split", "index_split",
                            *["write_shards"] * 2 * CONFIG["shards"]["jobs"]]), slurm_run.output
    for job_id, rule in submitted:
        assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED", rule
        (record,) = allocations(slurm_cluster, job_id)
        assert record["NodeList"] in slurm_cluster.nodes
        assert record["Partition"] == slurm_cluster.partition and record["Account"] == slurm_cluster.account


def test_training_ran_as_one_two_node_job(slurm_run, slurm_cluster):
    job_id = train_job_id(slurm_run)
    assert job_id, slurm_run.train_log()
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED"
    (record,) = allocations(slurm_cluster, job_id)
    assert sorted(hostnames(slurm_cluster, record["NodeList"])) == sorted(slurm_cluster.nodes)
    assert record["JobName"] == f"flashnet-train-{RUN}"
    # One task per node: each rank's log names its host.
    ranks = {}
    for path in (slurm_run.run_dir / "jobs").glob(f"{job_id}_*_log.out"):
        env = re.search(r"JobEnvironment\(job_id=\d+, hostname=(\S+), .* global_rank=(\d+)\(2\)\)", path.read_text())
        ranks[int(env.group(2))] = env.group(1)
    assert ranks == {0: slurm_cluster.nodes[0], 1: slurm_cluster.nodes[1]}
    result = summary(slurm_run.run_dir)
    assert (result["world_size"], result["nodes"], result["devices_per_node"]) == (2, 2, 1)


def test_evaluation_ran_as_slurm_job(slurm_run, slurm_cluster):
    log = (slurm_run.results / "logs" / "evaluate" / f"{RUN}.log").read_text()
    job_id = job_id_in(log, r"submitted slurm evaluation job (\d+)")
    assert job_id, log
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED"


def test_outputs(slurm_run):
    check_shards(slurm_run.results)
    check_run(slurm_run)
    check_report(slurm_run.results)


def test_shards_identical_to_a_local_run(slurm_run, tmp_path):
    local = Workflow.create(tmp_path / "local", CONFIG)
    proc = local.snakemake("--profile", str(REPO / "profiles" / "local"), *MANIFESTS)
    assert proc.returncode == 0, describe(proc)
    for split in ("train", "val"):
        assert manifest(slurm_run.results, split) == manifest(local.results, split)


def test_nothing_left_to_do(slurm_run):
    proc = slurm_run.snakemake(*PROFILE, "-n")
    assert proc.returncode == 0, describe(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr, describe(proc)


# --------------------------------------------------------------------------- interruptions


def test_training_survives_usr2_and_requeue(slurm_run, slurm_cluster, slurm_env, tmp_path):
    """Two interruptions mid-epoch: the USR2 signal (what SLURM sends signal_delay_s before the time
    limit; the job checkpoints at the next agreed step and submitit requeues it), then `scontrol
    requeue` (SLURM kills the job at once and queues it again; it resumes from its last periodic
    checkpoint). The result must be the uninterrupted run's, bit for bit."""
    workflow = reuse_shards(slurm_run, slurm_env, tmp_path / "wf")
    proc = workflow.start(*PROFILE, *FAST, TRAINED)
    log = tmp_path / "wf" / "snakemake.log"
    try:
        job_id = wait_for(lambda: train_job_id(workflow), 180, "the training job")
        wait_for(lambda: latest_step(workflow) >= 13, 300, "step 13")
        # `scancel --signal` without --batch/--full signals the job's tasks (the srun step), as
        # sbatch --signal=USR2@delay does; the batch shell would die of USR2.
        slurm_cluster.run(["scancel", "--signal=USR2", job_id])
        stopped = wait_for(lambda: stop_step(workflow.train_log()), 120, "the checkpoint after USR2")
        wait_for(lambda: workflow.train_log().count("resuming from") == 1 and latest_step(workflow) >= stopped + 13,
                 300, f"the requeued job to pass step {stopped + 13}")
        requeued_at = latest_step(workflow)
        slurm_cluster.run(["scontrol", "requeue", job_id])
        assert proc.wait(timeout=900) == 0, describe(None, log)
    finally:
        stop(proc)

    train_log = workflow.train_log()
    assert train_log.count("resuming from") == 2, train_log
    after_usr2, after_requeue = (progress_steps(part)[0] for part in train_log.split("resuming from")[1:])
    every = CONFIG["runs"][RUN]["log_every_steps"]
    assert after_usr2 == stopped + every  # nothing lost: the checkpoint was taken at the stop
    # from the last periodic checkpoint before the kill (checkpoint_every_minutes 0: at every check, or
    # the one before if that write was still in flight); the job trains on until SLURM's kill lands,
    # a few steps past requeued_at (seen: 2)
    assert stopped < after_requeue <= requeued_at + 5 * every
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED"  # sacct lags the controller
    runs = allocations(slurm_cluster, job_id)
    assert [r["State"] for r in runs] == ["REQUEUED", "REQUEUED", "COMPLETED"], runs
    assert runs[-1]["Restarts"] == 2
    assert sorted(hostnames(slurm_cluster, runs[-1]["NodeList"])) == sorted(slurm_cluster.nodes)

    assert summary(workflow.run_dir)["steps"] == summary(slurm_run.run_dir)["steps"]
    rows, reference = metrics(workflow.run_dir), metrics(slurm_run.run_dir)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference]  # each epoch once
    for column in ("step", "val_top1", "val_top5", "train_loss", "lr"):
        assert [r[column] for r in rows] == [r[column] for r in reference], column
    assert different_tensors(model_weights(workflow.run_dir), model_weights(slurm_run.run_dir)) == []


LAST_STATUS: list[str] = [""]  # what `flashnet status` last printed, for a failure's message


def flashnet_status(workflow: Workflow, slurm_cluster) -> dict[str, str]:
    """`flashnet status` for the workflow's configuration, beside the cluster (sacct answers): {run: row}."""
    proc = slurm_cluster.run([str(VENV_BIN / "flashnet"), "status", "--directory", str(workflow.workdir),
                              "--configfile", str(workflow.workdir / "overlay.yaml")], cwd=REPO)
    LAST_STATUS[0] = f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return {line.split()[0]: line for line in proc.stdout.splitlines()[2:] if line.strip()}


def status_row(workflow: Workflow, slurm_cluster, *words: str) -> str | None:
    row = flashnet_status(workflow, slurm_cluster).get(RUN, "")
    return row if all(word in row for word in words) else None


def test_status_and_terminal_lines_follow_a_queued_running_and_requeued_job(slurm_run, slurm_cluster, slurm_env,
                                                                            tmp_path):
    """`flashnet status` and the progress lines on Snakemake's terminal while the training job waits
    in the queue behind a job holding both nodes, then runs on them, then is requeued (`scontrol
    requeue`, what preemption does) and runs again to the end."""
    workflow = reuse_shards(slurm_run, slurm_env, tmp_path / "wf")
    assert status_row(workflow, slurm_cluster, "not started")
    # --exclusive: without it the blocker takes one CPU of each node's two, and the training job (one
    # task of one CPU per node) fits beside it and never waits.
    blocker = slurm_cluster.sbatch("--nodes=2", "--exclusive", "--job-name=blocker",
                                   f"--output={tmp_path}/blocker-%j.out", "--wrap", "sleep 600")
    # The blocker holds both nodes before the training job is queued, or the training job may start first.
    wait_for(lambda: slurm_cluster.job_state(blocker) == "RUNNING", 60, "the blocker job to hold the nodes")
    proc = workflow.start(*PROFILE, *FAST, TRAINED)
    log = tmp_path / "wf" / "snakemake.log"
    try:
        job_id = wait_for(lambda: train_job_id(workflow), 180, "the training job")
        queued = wait_for(lambda: status_row(workflow, slurm_cluster, "queued"), 120,
                          lambda: f"status: queued; it printed: {LAST_STATUS[0]}")
        assert f"{job_id} (slurm)" in queued and "requeued" not in queued, queued
        # The waiting rule's own poll sees the queue too before the nodes are freed (status can say
        # "queued" as soon as the rule records its job, a poll before the rule first asks SLURM).
        wait_for(lambda: f"[train {RUN}] queued, waiting for its nodes" in log.read_text(errors="replace"), 120,
                 lambda: f"the queued line on the terminal; it shows: {log.read_text(errors='replace')[-2000:]}")
        slurm_cluster.run(["scancel", blocker])
        # Past the first periodic checkpoint (SIGTERM from `scontrol requeue` checkpoints nothing), so the
        # requeued job resumes from it.
        checkpoint = workflow.workdir / "results" / "runs" / RUN / "checkpoints" / "last.ckpt"
        first_checkpoint = CONFIG["runs"][RUN]["log_every_steps"]  # checkpoint_every_minutes 0: every check
        running = wait_for(lambda: status_row(workflow, slurm_cluster, "running")
                           if latest_step(workflow) > first_checkpoint and checkpoint.exists() else None, 300,
                           lambda: f"status: running, past step {first_checkpoint}; it printed: {LAST_STATUS[0]}")
        nodes = allocations(slurm_cluster, job_id)[-1]["NodeList"]
        assert nodes in running and "requeued" not in running, running
        slurm_cluster.run(["scontrol", "requeue", job_id])
        wait_for(lambda: status_row(workflow, slurm_cluster, "requeued ×1"), 120,
                 lambda: f"status: requeued ×1; it printed: {LAST_STATUS[0]}")
        assert proc.wait(timeout=900) == 0, describe(None, log)
    finally:
        stop(proc)
        slurm_cluster.run(["scancel", blocker], check=False)
    assert status_row(workflow, slurm_cluster, "finished")
    terminal = log.read_text()
    for line in (f"[train {RUN}] submitted slurm job {job_id}; log ", f"[train {RUN}] queued, waiting for its nodes",
                 f"[train {RUN}] running on {nodes}", f"[train {RUN}] requeued (run 2 of the job)",
                 f"[train {RUN}] resumed from ", f"[train {RUN}] epoch 1/", f"[train {RUN}] finished: top-1 "):
        assert line in terminal, terminal[-4000:]


def test_lost_node_fails_the_rule_and_rerun_resumes(slurm_run, slurm_cluster, slurm_env, tmp_path):
    """A node dies mid-training (its slurmd and the rank on it). SLURM notices after ~25 s, marks the
    job NODE_FAIL and requeues it, and it would wait for two nodes; the train rule cancels it and
    fails, saying why and where the logs are. After the node is back, rerunning the workflow
    resumes from the last checkpoint."""
    import torch

    workflow = reuse_shards(slurm_run, slurm_env, tmp_path / "wf")
    victim = slurm_cluster.nodes[1]
    checkpoint = workflow.run_dir / "checkpoints" / "last.ckpt"
    proc = workflow.start(*PROFILE, *FAST, TRAINED)
    log = tmp_path / "wf" / "snakemake.log"
    try:
        job_id = wait_for(lambda: train_job_id(workflow), 180, "the training job")
        wait_for(lambda: latest_step(workflow) >= 23, 300, "step 23")  # past the epoch-2 checkpoint (step 20)
        slurm_cluster.kill_node(victim)
        returncode = proc.wait(timeout=300)
        snakemake_log = log.read_text()
        assert returncode != 0, snakemake_log
        assert "Error in rule train" in snakemake_log
        message = workflow.train_log()
        assert f"job {job_id} lost a node (NODE_FAIL" in message, message
        assert f"{victim} down" in message
        assert f"jobs/{job_id}_0_log.out" in message and f"jobs/{job_id}_0_log.err" in message
        # slurmctld's view (sacct keeps showing NODE_FAIL for a requeued job until it runs again):
        # cancelled, not pending for the dead node.
        assert slurm_cluster.job_info(job_id).get("JobState") in (None, "CANCELLED"), slurm_cluster.job_info(job_id)
        assert not slurm_cluster.run(["squeue", "-h", "-j", job_id], check=False).stdout.strip()
        assert [r["State"] for r in allocations(slurm_cluster, job_id)][:1] == ["NODE_FAIL"]
    finally:
        stop(proc)
        if slurm_cluster.node_state(victim) not in ("idle", "mix", "alloc"):
            slurm_cluster.restart_node(victim)
    saved_step = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    assert 20 <= saved_step < summary(slurm_run.run_dir)["steps"]

    proc = workflow.snakemake(*PROFILE, *FAST, TRAINED)
    assert proc.returncode == 0, describe(proc)
    train_log = workflow.train_log()  # the rerun's
    assert f"resuming from {checkpoint}" in train_log, train_log
    assert progress_steps(train_log)[0] == saved_step + CONFIG["runs"][RUN]["log_every_steps"]
    assert summary(workflow.run_dir)["steps"] == summary(slurm_run.run_dir)["steps"]
    assert [r["epoch"] for r in metrics(workflow.run_dir)] == [r["epoch"] for r in metrics(slurm_run.run_dir)]
    assert different_tensors(model_weights(workflow.run_dir), model_weights(slurm_run.run_dir)) == []


def part_shards(workflow: Workflow, split: str, part: int) -> list[str]:
    """The shards conversion job ``part`` of ``split`` writes, as keys of :func:`shard_identities`."""
    from flashnet.data.shards import load_plan

    plan = load_plan(workflow.results / "shards" / split / "index.json")
    return [f"{split}/{plan.shard_name(i)}" for i in plan.part_shards(part, CONFIG["shards"]["jobs"])]


@pytest.mark.parametrize("how", ["interrupted", "killed"])
def test_stopped_snakemake_rerun_keeps_finished_shards(how, slurm_run, slurm_cluster, slurm_env, tmp_path):
    """Snakemake stopped while the shard jobs run. Interrupted (SIGINT, as by Ctrl-C), it cancels
    its SLURM jobs. Killed (SIGKILL, as with a lost login session), it leaves its jobs running and
    its lock behind: `snakemake --unlock`, then the rerun, whose conversion job of a part still
    being converted waits for the old one (the part's lock). Either way the rerun
    (--rerun-incomplete) skips, by the journals, every shard already written: none is rewritten."""
    workflow = Workflow.create(tmp_path / "wf", CONFIG, slurm_env)
    workflow.copy_inputs_from(slurm_run, shards=False)
    proc = workflow.start(*PROFILE, *FAST, *MANIFESTS)
    log = tmp_path / "wf" / "snakemake.log"
    try:
        wait_for(lambda: list(workflow.results.glob("shards/*/*.tar")), 300, "the first shard", interval=0.05)
        proc.send_signal(signal.SIGINT if how == "interrupted" else signal.SIGKILL)
        assert proc.wait(timeout=120) != 0, describe(None, log)
    finally:
        stop(proc)
    if how == "interrupted":
        assert "Terminating processes on user request" in log.read_text()
        wait_for(lambda: not slurm_cluster.run(["squeue", "-h"]).stdout.strip(), 120, "the cancelled jobs to end")
    else:
        unlock = workflow.snakemake(*PROFILE, "--unlock")
        assert unlock.returncode == 0, describe(unlock)
    before = shard_identities(workflow.results)

    proc = workflow.snakemake(*PROFILE, *FAST, "--rerun-incomplete", *MANIFESTS)
    assert proc.returncode == 0, describe(proc)
    rerun = [wildcards.rsplit("_", 1) for _, rule, wildcards in SUBMITTED.findall(proc.stdout + proc.stderr)
             if rule == "write_shards"]
    redone = {name for split, part in rerun for name in part_shards(workflow, split, int(part))}
    if how == "interrupted":  # killed, its jobs may all have finished before the rerun looks
        assert redone & set(before), f"no rerun conversion job had finished shards: {rerun}, {sorted(before)}"

    after = shard_identities(workflow.results)
    assert {name: after.get(name) for name in before} == before  # same inode, same mtime: not rewritten
    check_shards(workflow.results)
    for split in ("train", "val"):
        assert manifest(workflow.results, split) == manifest(slurm_run.results, split)
    # Jobs a killed Snakemake left behind end on their own (later tests need the nodes).
    wait_for(lambda: not slurm_cluster.run(["squeue", "-h"]).stdout.strip(), 300, "the left-behind jobs to end")


def test_a_run_resumes_on_another_layout_at_the_same_global_batch(slurm_run, slurm_cluster, slurm_env, tmp_path):
    """Issue 22, case 1, on the real cluster: a run on 2 nodes × 1 device is cancelled after a
    background checkpoint, the config is changed to 1 node × 2 devices (same global batch, same
    per-device batch and BN span), and the rerun resumes instead of starting afresh: the terminal
    says so before the job is submitted, and the final weights are the uninterrupted run's."""
    workflow = reuse_shards(slurm_run, slurm_env, tmp_path / "wf")
    checkpoint = workflow.run_dir / "checkpoints" / "last.ckpt"
    proc = workflow.start(*PROFILE, *FAST, TRAINED)
    try:
        job_id = wait_for(lambda: train_job_id(workflow), 180, "the training job")
        wait_for(lambda: latest_step(workflow) >= 13 and checkpoint.exists(), 300, "step 13 and a checkpoint")
        slurm_cluster.run(["scancel", job_id])  # killed without warning: the last background checkpoint counts
        proc.wait(timeout=300)
    finally:
        stop(proc)
    assert slurm_cluster.wait_job(job_id, timeout=120) == "CANCELLED"

    (workflow.workdir / "overlay.yaml").write_text(yaml.safe_dump(tiny_config(nodes=1, devices_per_node=2),
                                                                   sort_keys=False))
    proc = workflow.snakemake(*PROFILE, *FAST, TRAINED)
    assert proc.returncode == 0, describe(proc)
    said = proc.stdout + proc.stderr
    assert (f"[train {RUN}] resuming on another layout (nodes 2 → 1, devices_per_node 1 → 2): sample order, "
            "learning rate and BN span unchanged") in said, said
    result, reference = summary(workflow.run_dir), summary(slurm_run.run_dir)
    assert result["steps"] == reference["steps"] and result["world_size"] == 2
    (change,) = result["layout_changes"]
    assert change["nodes"] == "2 → 1" and change["devices_per_node"] == "1 → 2" and change["at_step"] > 0
    assert different_tensors(model_weights(workflow.run_dir), model_weights(slurm_run.run_dir)) == []
