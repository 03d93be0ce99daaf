"""flashnet: large-batch ImageNet training records, reproduced on a SLURM cluster."""
