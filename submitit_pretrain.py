"""Submit main_pretrain.py to SLURM with submitit: every flag of main_pretrain.py plus the SLURM ones.

    python submitit_pretrain.py --nodes 2 --ngpus 8 --partition gpu --job_dir /shared/%j ...(main_pretrain flags)

Preemption and timeouts requeue the job, which resumes at the step where it stopped
(launch/slurm.py). `--local` runs the same job with submitit's local executor.
"""
from config.cli import answer_usage_first_with, run_main
from launch import slurm

if __name__ == "__main__":  # main_pretrain.py answers --help and flag errors with this parser before torch loads
    answer_usage_first_with(slurm.early_parser("main_pretrain"))

import main_pretrain  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: slurm.main(main_pretrain))
