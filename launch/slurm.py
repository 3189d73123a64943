"""Submitting the programs to SLURM through submitit (shared by submitit_pretrain.py / submitit_finetune.py).

* One task per GPU; ``--nodes`` x ``--ngpus``. Rendezvous through a fresh file in the
  shared job folder (``file://``), created per (re)start, so no port needs to be free.
* Preemption / timeout: SLURM (or submitit's local executor) sends USR2 to every task.
  Each rank's handler only raises a stop flag; the ranks agree on it every few steps
  and all stop at the same step boundary, where rank 0 writes a checkpoint (mid-epoch
  included). Rank 0 then re-raises USR2 to submitit's own handler, which calls
  ``Trainer.checkpoint`` (a requeue that resumes from that file through the normal
  auto-resume path) and requeues the job. Nothing since the last step is lost, and an
  uninterrupted and a preempted-and-requeued run end with the same weights.
* SIGTERM / SIGUSR1 / SIGINT checkpoint and exit without requeueing (as outside SLURM).
  SLURM delivers its signals to every process of the job step, DataLoader workers
  included; those ignore them (engine.stop.ignore_stop_signals), so only the ranks act.
* MAE's wrapper requeued with ``--resume checkpoint.pth``, a file it never wrote, so a
  requeued job silently restarted from epoch 0; here resumption never depends on a name.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import signal
import sys
import uuid
from pathlib import Path
from types import ModuleType

import submitit

from config.cli import ArgumentParser, HelpFormatter, parse
from errors import UsageError


def add_slurm_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SLURM / submitit")
    g.add_argument("--ngpus", default=None, type=int,
                   help="GPUs (= tasks) per node (default: the GPUs visible here, 1 process on a CPU machine)")
    g.add_argument("--nodes", default=1, type=int, help="nodes")
    g.add_argument("--timeout", default=4320, type=int, help="minutes per job (before requeue)")
    g.add_argument("--job_dir", default="./work_dirs/submitit/%j", help="shared folder; %%j = job id")
    g.add_argument("--partition", default="", type=str, help="SLURM partition (default: the cluster's)")
    g.add_argument("--account", default="", type=str, help="SLURM account (default: yours)")
    g.add_argument("--qos", default="", type=str, help="SLURM quality of service (default: none)")
    g.add_argument("--constraint", default="", type=str, help="SLURM node constraint (default: none)")
    g.add_argument("--use_volta32", action="store_true", help="constraint volta32gb")
    g.add_argument("--comment", default="", type=str, help="SLURM job comment (default: none)")
    g.add_argument("--mem_gb", default=None, type=int, help="memory per node (default 40 per GPU)")
    g.add_argument("--cpus_per_task", default=10, type=int, help="CPUs per task (data-loading workers)")
    g.add_argument("--max_requeues", default=30, type=int, help="timeouts tolerated before giving up")
    g.add_argument("--local", action="store_true", help="run with submitit's local executor (no SLURM)")
    g.add_argument("--job_name", default=None, help="job name (default: the program's)")


class Trainer:
    """The submitted callable: one instance per task; ``checkpoint`` builds the requeued one."""

    def __init__(self, program: str, args: argparse.Namespace) -> None:
        self.program = program  # module name: "main_pretrain" or "main_finetune"
        self.args = args

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        args = copy.deepcopy(self.args)
        job_dir = Path(str(args.job_dir).replace("%j", str(env.job_id)))
        if not args.output_dir:
            args.output_dir = str(job_dir)
        if args.log_dir is None:  # ('' keeps TensorBoard off)
            args.log_dir = str(Path(args.output_dir) / "tensorboard")
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                          LOCAL_RANK=str(env.local_rank), LOCAL_WORLD_SIZE=str(args.ngpus))
        if env.global_rank == 0:
            _remove_literal_job_folder(args.job_dir)
        if args.device is None or str(args.device).startswith("cuda"):
            args.device = "cuda" if args.ngpus > 0 and _cuda() else "cpu"
        program: ModuleType = importlib.import_module(self.program)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        code = program.main(program.configure(args))  # installs the stop handlers (engine.stop), SIGUSR2 among them
        from engine.stop import stopped_by  # (torch: imported by the job, not by --help)
        if stopped_by() == signal.SIGUSR2 and env.global_rank == 0:
            # checkpoint written at a step boundary: let submitit requeue through its own handler
            signal.signal(signal.SIGUSR2, submitit_handler)
            signal.raise_signal(signal.SIGUSR2)
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeue: same arguments, a fresh rendezvous file; auto-resume finds the newest checkpoint."""
        args = copy.deepcopy(self.args)
        args.dist_url = new_rendezvous(args.job_dir)
        args.resume = ""
        args.auto_resume = True
        return submitit.helpers.DelayedSubmission(Trainer(self.program, args))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _remove_literal_job_folder(job_dir: str) -> None:
    """submitit's local executor creates its folder argument unformatted (a literal ``%j``) before it
    starts the tasks; the job's files are in the formatted folder, so an empty literal one goes."""
    if "%j" in str(job_dir):
        try:
            Path(job_dir).rmdir()
        except OSError:  # absent, or not empty: not ours to remove
            pass


def new_rendezvous(job_dir: str) -> str:
    folder = Path(str(job_dir).replace("%j", "shared")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".rendezvous_{uuid.uuid4().hex}"
    return path.as_uri()


def submit(program: str, args: argparse.Namespace) -> submitit.Job:
    """Validate the program's arguments, then submit (or run locally with ``--local``)."""
    folder = Path(args.job_dir)
    executor_cls = submitit.LocalExecutor if args.local else submitit.AutoExecutor
    executor = executor_cls(folder=str(folder)) if args.local else executor_cls(
        folder=str(folder), slurm_max_num_timeout=args.max_requeues)
    kwargs = dict(timeout_min=args.timeout, tasks_per_node=args.ngpus)
    if args.local:
        kwargs["gpus_per_node"] = args.ngpus if _cuda() else 0
        executor.update_parameters(**kwargs)
    else:
        extra = {}
        if args.comment:
            extra["comment"] = args.comment
        if args.account:
            extra["account"] = args.account
        if args.qos:
            extra["qos"] = args.qos
        constraint = "volta32gb" if args.use_volta32 else args.constraint
        if constraint:
            extra["constraint"] = constraint
        executor.update_parameters(mem_gb=args.mem_gb or 40 * args.ngpus, gpus_per_node=args.ngpus,
                                   cpus_per_task=args.cpus_per_task, nodes=args.nodes,
                                   slurm_partition=args.partition or None, slurm_signal_delay_s=120,
                                   slurm_additional_parameters=extra or None, **kwargs)
    executor.update_parameters(name=args.job_name or program)
    args.dist_url = new_rendezvous(args.job_dir)
    # the job starts in submitit's interpreter, possibly in another folder: let it import the programs
    root = str(Path(__file__).resolve().parents[1])
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return executor.submit(Trainer(program, args))


def build_parser(program: ModuleType) -> argparse.ArgumentParser:
    """The program's flags (the help of those whose defaults mean something else under submitit
    rewritten) and SLURM's."""
    program_parser = program.get_args_parser(False)
    for action in program_parser._actions:
        if action.dest == "output_dir":
            action.help = "checkpoints, log.txt, run records and figures (default: the job folder)"
        elif action.dest == "dist_url":
            action.help = "rendezvous URL (default: a fresh file in the job folder)"
    parser = ArgumentParser(f"submitit for {program.__name__}", parents=[program_parser],
                                     formatter_class=HelpFormatter)
    add_slurm_args(parser)
    parser.set_defaults(output_dir="", log_dir=None, dist_url="")
    return parser


def early_parser(name: str):
    """For config.cli.answer_usage_first_with: the wrapper's parser (program ``name``'s flags + SLURM's),
    built from the program's parser before the program's heavy modules load."""
    from types import SimpleNamespace
    return lambda get_args_parser: build_parser(SimpleNamespace(__name__=name, get_args_parser=get_args_parser))


def prepare(program: ModuleType, argv=None) -> argparse.Namespace:
    """Parse the wrapped program's flags + SLURM flags and check them (the program's ``configure``,
    which has no side effects) before anything is submitted; the job configures them again on its node."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(build_parser(program), argv, sys.argv[0])
    args.launch_command = [sys.argv[0], *argv]  # for the run record: the job itself runs submitit's command
    if args.ngpus is None:
        args.ngpus = _visible_gpus()
        if not args.local:
            print(f"--ngpus not given: {args.ngpus} task(s) per node, the GPUs visible here", file=sys.stderr)
    if args.nodes > 1 and args.local:
        raise UsageError("--local runs on one node; drop --nodes")
    check = copy.copy(args)
    if check.device is None or str(check.device).startswith("cuda"):
        check.device = None  # the compute node's device: what is checked here is the rest
        check.device_on_node = True
    program.configure(check)
    return args


def _visible_gpus() -> int:
    """GPUs this process sees (CUDA_VISIBLE_DEVICES honoured); 1 (one process) on a machine without."""
    import torch
    return torch.cuda.device_count() or 1


def submitted_line(job_id: str, job_dir: str, local: bool) -> str:
    """What the user needs after submitting: where the job runs, which log to follow, where its outputs go."""
    folder = job_dir.replace("%j", job_id)
    log = Path(folder) / f"{job_id}_0_log.out"
    where = ("runs in the background on this machine (--local); this command returns at once" if local else
             f"is queued on SLURM (squeue -j {job_id})")
    return f"submitted job {job_id}: it {where}. Follow its output with: tail -f {log}; checkpoints in {folder}"


def main(program: ModuleType, argv=None) -> int:
    """Validate, submit, print the job id."""
    args = prepare(program, argv)
    job = submit(program.__name__, args)
    print(submitted_line(str(job.job_id), args.job_dir, args.local))
    return 0
