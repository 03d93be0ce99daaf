# Config validation and the helpers every rule uses; the logic lives in flashnet.pipeline.
import json
import os
import re

import flashnet.pipeline as pipeline

config["runs"] = pipeline.expand_presets(config, workflow.basedir)
# The conda environments (envs/*.yaml) install flashnet from here.
os.environ.setdefault("FLASHNET_ROOT", workflow.basedir)
validate(config, "../schemas/config.schema.yaml")

RESULTS = config["results_dir"]
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"


wildcard_constraints:
    split="train|val",
    part=r"\d+",
    run="|".join(map(re.escape, config["runs"])) or "(?!)",


def final_outputs():
    return pipeline.final_outputs(config)


# --forcerun write_shards / train (or -F): shards rewritten, training from scratch, also on SLURM.
# Set when execution starts, before any job: which rules are forced is not known yet while this file
# is read.
onstart:
    pipeline.pass_forced_flags(workflow)


# A failed job under --keep-going: report the runs that finished, the others listed with why
# (Snakemake skips the report rule, whose inputs include the failed run's files).
onerror:
    pipeline.report_what_finished(config, workflow)
