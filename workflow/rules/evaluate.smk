# Evaluate each run's final checkpoint on the val shards, every sample exactly once.


rule evaluate:
    input:
        model=f"{RESULTS}/runs/{{run}}/model.pt",
        summary=f"{RESULTS}/runs/{{run}}/summary.json",
        val=f"{RESULTS}/shards/val/manifest.json",
        # Fails at DAG time if another invocation's job for this run still runs (no files).
        in_progress=lambda wildcards: pipeline.refuse_run_in_progress(config, wildcards.run),
    output:
        f"{RESULTS}/runs/{{run}}/eval.json",
    log:
        f"{LOGS}/evaluate/{{run}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{{run}}.tsv"
    params:
        run_dir=lambda wildcards, input: os.path.dirname(input.summary),
        launcher=lambda wildcards, resources: pipeline.evaluate_launcher_json(
            config, wildcards.run, resources, pipeline.executor_name(workflow)
        ),
        batch_size=config["evaluate"]["batch_size"],
        devices=config["evaluate"]["devices"],
        workers=config["evaluate"]["workers"],
    conda:
        "../../envs/train.yaml"
    # Cores its job takes on this host: the run's processes with a local cluster (--cores bounds how
    # many run at once), 1 under SLURM, where it only waits (runs_in_flight bounds how many wait).
    threads: lambda wildcards: pipeline.host_cores(config, wildcards.run, pipeline.executor_name(workflow), evaluation=True)
    resources:
        mem_mb=1000,
        runs_in_flight=1,
    localrule: True
    shell:
        "flashnet evaluate --run-dir {params.run_dir:q} --val-manifest {input.val:q} --launcher {params.launcher:q}"
        " --batch-size {params.batch_size} --devices {params.devices} --workers {params.workers}"
        " --out {output:q} --progress-fd 3 --log-file {log:q} 3>&2 > {log:q} 2>&1"
