# ImageNet (any layout) → WebDataset shards + manifest, one conversion job per shard range.


rule sample_data:
    output:
        pipeline.sample_data_files(config),
    log:
        f"{LOGS}/sample_data/sample_data.log",
    benchmark:
        f"{BENCHMARKS}/sample_data/sample_data.tsv"
    params:
        out=lambda wildcards, output: os.path.dirname(output[0]),
        args=pipeline.sample_data_args(config),
    conda:
        "../../envs/data.yaml"
    resources:
        runtime=30,
        mem_mb=2000,
    shell:
        "flashnet sample-data {params.out:q} {params.args} > {log:q} 2>&1"


rule index_split:
    input:
        pipeline.dataset_files(config),
    output:
        f"{RESULTS}/shards/{{split}}/index.json",
    log:
        f"{LOGS}/index_split/{{split}}.log",
    benchmark:
        f"{BENCHMARKS}/index_split/{{split}}.tsv"
    params:
        data_dir=lambda wildcards, input: pipeline.data_dir_of(input),
        samples_per_shard=config["shards"]["samples_per_shard"],
        seed=config["shards"]["seed"],
        # One-file-per-image layouts: the split's files, listed (count and hash of names and folder
        # times); a changed listing reruns the index, and so the shards. The input folders alone miss
        # files added to a class folder. None for the official tars, which are the input files.
        **pipeline.input_listing_param(config),
    conda:
        "../../envs/data.yaml"
    resources:
        runtime=60,
        mem_mb=4000,
    shell:
        "flashnet index {params.data_dir:q} --split {wildcards.split} --samples-per-shard {params.samples_per_shard}"
        " --seed {params.seed} --out {output:q} > {log:q} 2>&1"


rule write_shards:
    input:
        index=f"{RESULTS}/shards/{{split}}/index.json",
        # Both splits indexed (and so checked) first: bad input fails before any shard is written.
        checked=expand(f"{RESULTS}/shards/{{split}}/index.json", split=pipeline.SPLITS),
    output:
        f"{RESULTS}/shards/{{split}}/parts/{{part}}.json",
    log:
        f"{LOGS}/write_shards/{{split}}-{{part}}.log",
    benchmark:
        f"{BENCHMARKS}/write_shards/{{split}}-{{part}}.tsv"
    params:
        parts=config["shards"]["jobs"],
        options=pipeline.shard_options(config),
    conda:
        "../../envs/data.yaml"
    resources:
        runtime=240,
        mem_mb=4000,
    shell:
        "flashnet write-shards {input.index:q} --part {wildcards.part} --parts {params.parts} {params.options}"
        # --rewrite when this invocation forces write_shards (flashnet/pipeline.py, pass_forced_flags)
        " ${{FLASHNET_REWRITE_SHARDS:-}} --out {output:q} > {log:q} 2>&1"


rule manifest:
    input:
        index=f"{RESULTS}/shards/{{split}}/index.json",
        parts=pipeline.part_files(config, f"{RESULTS}/shards/{{split}}/parts"),
    output:
        manifest=f"{RESULTS}/shards/{{split}}/manifest.json",
        # every sample's byte range in its shard, named by the manifest; the train loader reads by it
        ranges=f"{RESULTS}/shards/{{split}}/sample-ranges.npy",
    log:
        f"{LOGS}/manifest/{{split}}.log",
    benchmark:
        f"{BENCHMARKS}/manifest/{{split}}.tsv"
    params:
        max_rejected=config["shards"]["max_rejected"],
    conda:
        "../../envs/data.yaml"
    resources:
        runtime=120,
        mem_mb=4000,
    shell:
        "flashnet manifest {input.index:q} --parts {input.parts:q} --max-rejected {params.max_rejected}"
        " --out {output.manifest:q} > {log:q} 2>&1"
