# One training run per name in config["runs"]. The rule runs on the submitting host and hands the
# run to submitit (local processes, or a SLURM job under the slurm profile), then waits for it.
# The run folder also gets mllog.txt, not declared as an output: Snakemake deletes a job's outputs
# before rerunning it, and a resumed run appends to its MLPerf log.


rule train:
    input:
        train=f"{RESULTS}/shards/train/manifest.json",
        val=f"{RESULTS}/shards/val/manifest.json",
        # Fails at DAG time if another invocation's job for this run still runs (no files).
        in_progress=lambda wildcards: pipeline.refuse_run_in_progress(config, wildcards.run),
    output:
        summary=f"{RESULTS}/runs/{{run}}/summary.json",
        metrics=f"{RESULTS}/runs/{{run}}/metrics.csv",
        steps=f"{RESULTS}/runs/{{run}}/steps.csv",
        model=f"{RESULTS}/runs/{{run}}/model.pt",
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{run}}.tsv"
    params:
        # What decides the result: Snakemake reruns the job when it changes ("Params have changed").
        result=lambda wildcards: pipeline.run_result_json(config, wildcards.run),
        # Every setting, for the command. A param computed from `output` is one Snakemake does not
        # compare between runs (a "derived" param), so a result-neutral key (loggers, tracker
        # settings, log_every_steps, loader_workers, checkpoint_every_minutes) changes no plan.
        run=lambda wildcards, output: pipeline.run_json(config, wildcards.run),
        mlperf=pipeline.mlperf_json(config),
        launcher=lambda wildcards, resources: pipeline.train_launcher_json(
            config, wildcards.run, resources, pipeline.executor_name(workflow)
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    conda:
        "../../envs/train.yaml"
    # Cores its job takes on this host: the run's processes with a local cluster (--cores bounds how
    # many run at once), 1 under SLURM, where it only waits (runs_in_flight bounds how many wait).
    threads: lambda wildcards: pipeline.host_cores(config, wildcards.run, pipeline.executor_name(workflow))
    resources:
        mem_mb=1000,
        runs_in_flight=1,
    localrule: True
    shell:
        "flashnet train --name {wildcards.run} --run {params.run:q} --launcher {params.launcher:q}"
        " --train-manifest {input.train:q} --val-manifest {input.val:q} --out-dir {params.out_dir:q}"
        " --mlperf {params.mlperf:q}"
        # --fresh when this invocation forces train (or -F): from scratch, not from an interrupted
        # run's checkpoint (flashnet/pipeline.py, pass_forced_flags)
        " ${{FLASHNET_FRESH_TRAIN:-}}"
        # Progress lines reach Snakemake's stderr on fd 3 (flashnet/watch.py); everything goes to the log.
        " --progress-fd 3 --log-file {log:q} 3>&2 > {log:q} 2>&1"
