"""Submit main_finetune.py to SLURM with submitit: every flag of main_finetune.py plus the SLURM ones.

    python submitit_finetune.py --nodes 2 --ngpus 8 --partition gpu --job_dir /shared/%j ...(main_finetune flags)

Preemption and timeouts requeue the job, which resumes at the step where it stopped
(launch/slurm.py). `--local` runs the same job with submitit's local executor.
"""
from config.cli import answer_usage_first_with, run_main
from launch import slurm

if __name__ == "__main__":  # main_finetune.py answers --help and flag errors with this parser before torch loads
    answer_usage_first_with(slurm.early_parser("main_finetune"))

import main_finetune  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: slurm.main(main_finetune))
