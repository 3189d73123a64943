"""The programs' command line: common flags, recipes (--config), the run section resolved from the
flags, and one-line errors.

The surface is argparse with MAE's flag names. A program parses its flags (``parse``: parser
defaults < recipe < command line), resolves them with its model's contract into a frozen config
(config/pretrain.py, ...) and only then starts its run (engine.run.start_run), where side effects
begin: nothing here creates a folder or writes the environment."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from errors import CheckpointError, DataError, UsageError, error_line
from config.rules import COMMON_RULES, Problems, check_existing, check_ranges, unknown_choice
from engine.cpu_flags import add_cpu_tuning_args


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose flag errors are the error line first (named after the program's file,
    as its other errors are), close flag names for an unknown one, and a pointer to --help instead
    of the usage wall."""

    def error(self, message: str):
        prog = os.path.basename(sys.argv[0]) or self.prog
        if message.startswith("unrecognized arguments: "):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = {m for arg in message.split(": ", 1)[1].split() if arg.startswith("-")
                     for m in difflib.get_close_matches(arg.split("=")[0], known, n=2, cutoff=0.7)}
            if close:
                message += f" (did you mean {' or '.join(sorted(close))}?)"
        self.exit(2, f"{prog}: error: {message}; python {prog} --help lists every flag\n")


# how a program that runs another's parser builds its own from it (main_linprobe.py: main_finetune.py's
# with a recipe; submitit_*.py: the program's plus SLURM's flags); set before importing that program
_usage_first_parser: Optional[Callable[[Callable[..., argparse.ArgumentParser]], argparse.ArgumentParser]] = None


def answer_usage_first_with(build: Callable[[Callable[..., argparse.ArgumentParser]], argparse.ArgumentParser]
                            ) -> None:
    """A program built on another one's parser asks for that program's early answer (``answer_usage_first``)
    before importing it; ``build(get_args_parser)`` is its own parser."""
    global _usage_first_parser
    _usage_first_parser = build


def recipe_defaults(recipe: str) -> Callable[[Callable[..., argparse.ArgumentParser]], argparse.ArgumentParser]:
    """For ``answer_usage_first_with``: the program's parser with ``recipe``'s values as its defaults."""
    def build(get_args_parser):
        parser = get_args_parser()
        parser.set_defaults(**load_recipe(recipe, flag_names(parser)))
        return parser
    return build


def answer_usage_first(get_args_parser: Callable[..., argparse.ArgumentParser], as_program: bool) -> None:
    """Called where a program's parser is defined, above its heavy imports (torch, torchvision, timm):
    run as a program (``as_program``, or asked by ``answer_usage_first_with``), parse the command line
    once, so that --help and a wrong flag answer at once; the real parse follows. Otherwise nothing."""
    if not as_program and _usage_first_parser is None:
        return
    parser = _usage_first_parser(get_args_parser) if _usage_first_parser is not None else get_args_parser()
    parser.parse_args()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, unless its help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text  # switches say in their text when they are on by default
        return super()._get_help_string(action)


# Minutes a collective waits for a hung rank. The ranks meet at every optimizer step; the longest
# legitimate gap is rank 0 alone writing a checkpoint or a figure (seconds to a minute for Swin-B with
# its optimizer on a network file system), so 3 minutes catches a hang 7 minutes sooner than the
# 10 minutes it was, with room to spare.
DIST_TIMEOUT_MIN = 3.0



def add_common_args(p: argparse.ArgumentParser, save_help: str = "write checkpoint-{epoch}.pth every N epochs",
                    exit_help: str = "finish this epoch, checkpoint and exit (the schedule still spans --epochs); "
                                     "e.g. to fit a job's time slot") -> None:
    """The flags every program shares (engine.run.RunConfig); ``save_help`` / ``exit_help`` say what a
    period is in programs that count something else than epochs."""
    p.add_argument("--config", default=None,
                   help="a recipe: a YAML file of flag: value lines (recipes/), or a checkpoint whose flags rebuild "
                        "its run; flags on the command line override it")
    p.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, run records and figures")
    p.add_argument("--log_dir", default=None,
                   help="TensorBoard folder (default: OUTPUT_DIR/tensorboard; '' disables)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", default=0, type=int, help="seed of every random draw (data order, crops, masks, init)")
    p.add_argument("--resume", default="", help="resume from this checkpoint")
    p.add_argument("--auto_resume", action="store_true", default=True,
                   help="resume from the newest good checkpoint in --output_dir (default on)")
    p.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                   help="start from scratch even if --output_dir holds checkpoints")
    p.add_argument("--allow_changed_args", action="store_true",
                   help="auto-resume even though run-shaping flags (input size, effective batch, lr/blr, epochs, "
                        "warmup, mask flags, --finetune) differ from the checkpoint's; the differences are listed")
    p.add_argument("--start_epoch", default=0, type=int, help="first epoch when not resuming")
    p.add_argument("--num_workers", default=None, type=int,
                   help="DataLoader worker processes per rank (default: the CPUs available to each rank, at most "
                        "10, one fewer on a CPU device, whose training uses the same cores)")
    p.add_argument("--pin_mem", action="store_true", default=True, help="pin loaded batches in memory for CUDA runs (default on)")
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin loaded batches")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="autocast precision (default: bf16 on a GPU that supports it, none on CPU)")
    p.add_argument("--bf16", action="store_true", help="the reference's spelling of --amp bf16")
    p.add_argument("--clip_grad", type=float, default=None, help="gradient norm clipping (default off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_cpu_tuning_args(p)
    p.add_argument("--save_freq", default=20, type=int, help=save_help)
    p.add_argument("--keep_last", default=0, type=int, help="keep only the newest K numbered checkpoints (0: all)")
    p.add_argument("--exit_after_epoch", default=-1, type=int, help=exit_help)
    p.add_argument("--max_skipped", default=None, type=int,
                   help="end the run when an epoch skips more unreadable samples than this, all ranks together "
                        "(-1: never); default: 1%% of the epoch's samples, at least 50. Each skipped sample is "
                        "named in OUTPUT_DIR/skipped-samples.txt")
    p.add_argument("--print_freq", default=20, type=int, help="progress line every N steps")
    p.add_argument("--world_size", default=1, type=int, help="set by torchrun / submitit")
    p.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="accepted for torch.distributed.launch")
    p.add_argument("--dist_on_itp", action="store_true", help="read the rank from OpenMPI variables")
    p.add_argument("--dist_url", default="env://", help="rendezvous URL")
    p.add_argument("--dist_timeout", default=DIST_TIMEOUT_MIN, type=float,
                   help=f"minutes a collective waits for a hung rank before the run fails (default "
                        f"{DIST_TIMEOUT_MIN:g}; raise it when ranks legitimately drift apart for longer, e.g. a slow "
                        f"shared file system at start-up)")
    p.add_argument("--max_checkpoint_gb", default=None, type=float,
                   help="largest checkpoint file content loaded (default: 8x the model's fp32 weights, at least "
                        "256 MB); see FINETUNE.md 'Loading checkpoints safely'")


def resolve_run(flags) -> dict:
    """The run section's values (engine.run.RunConfig) from the common flags, checked (every problem in
    one UsageError); no side effects."""
    problems = Problems()
    with problems.check():
        check_existing(flags, ["resume"])
    with problems.check():
        check_ranges(flags, COMMON_RULES)
    amp = flags.amp
    if flags.bf16:
        if amp not in (None, "bf16"):
            problems.add(f"--bf16 contradicts --amp {amp}")
        amp = "bf16"
    import torch
    device = flags.device if flags.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        problems.add(f"--device {device} but no CUDA device is available; valid here: cpu")
    elif not str(device).startswith(("cuda", "cpu")):
        problems.add(f"--device {device!r}: valid choices are cuda, cuda:N, cpu")
    elif amp == "fp16" and not str(device).startswith("cuda"):
        problems.add("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or --amp none")
    log_dir = os.path.join(flags.output_dir, "tensorboard") if flags.log_dir is None else (flags.log_dir or None)
    with problems.check():
        check_output_dir(flags.output_dir)
        if log_dir:
            check_output_dir(log_dir)
    problems.raise_any()
    from engine.run import RunConfig
    values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(RunConfig) if hasattr(flags, f.name)}
    values.update(device=device, amp=amp, log_dir=log_dir,
                  cpu_matmul=flags.cpu_matmul or ("onednn" if flags.cpu_tuning else "aten"),
                  launch_command=tuple(getattr(flags, "launch_command", ()) or ()))
    return values


def check_output_dir(path: str) -> None:
    """An output folder that exists and is writable, or can be created: checked without creating it
    (start-up creates it: engine.run.make_output_dir)."""
    p = Path(path).absolute()
    while not p.exists():
        if p.is_symlink():
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise UsageError(f"output folder {path} is not writable: {p} is not a folder")
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {path} is not writable: permission denied")


def flag_names(parser: argparse.ArgumentParser) -> set[str]:
    """The destinations of a parser's flags (what a recipe may set)."""
    return {a.dest for a in parser._actions} - {"help"}


def flag_fields(config_type) -> list[str]:
    """The fields of a config type that are flags (not facts found while resolving, e.g. image counts)."""
    return [f.name for f in dataclasses.fields(config_type) if f.metadata.get("flag", True)]


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], program: str,
          defaults: Optional[dict] = None, architecture: Sequence[str] = (), marker: str = "") -> argparse.Namespace:
    """The program's flags: the parser's defaults, then ``defaults``, then a recipe (--config FILE), then
    the architecture flags a trained checkpoint stores (``architecture``: read from ``--resume``, or
    from ``--finetune`` under ``--eval``; see ``weights_to_evaluate``; only from a checkpoint of this
    program: one whose flags include ``marker``), then the command line.
    ``program``: the file name the run record shows in the launch command. Sets ``flags.stored``
    to that checkpoint's flags (None when none was read)."""
    if defaults:
        parser.set_defaults(**defaults)
    known = flag_names(parser)
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        parser.set_defaults(**load_recipe(first.config, known))
    stored = None
    source = weights_to_evaluate(first) if architecture else ""
    if source and Path(source).is_file():
        stored = checkpoint_flags(source)
        if stored is not None and marker in stored:
            parser.set_defaults(**{k: tuple(stored[k]) if isinstance(stored[k], list) else stored[k]
                                   for k in architecture if k in stored})
    flags = parser.parse_args(argv)
    flags.stored = stored
    if argv is not None:  # called in-process (tools, tests): the run record shows these flags
        flags.launch_command = [program, *argv]
    return flags


def weights_to_evaluate(flags: argparse.Namespace) -> str:
    """The trained checkpoint whose architecture a dense program rebuilds: ``--resume``, or under
    ``--eval`` the ``--finetune`` file ('' when neither)."""
    return getattr(flags, "resume", "") or (getattr(flags, "finetune", "") if getattr(flags, "eval", False) else "")


def checkpoint_flags(path: str) -> Optional[dict]:
    """The flags a checkpoint stores (``config``, else the reference's ``args``); None when it keeps none."""
    from engine.checkpoint import safe_load
    ckpt = safe_load(path)
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(stored, dict):
        stored = vars(ckpt["args"]) if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), argparse.Namespace) \
            else None
    return stored


def check_task_checkpoint(flags: argparse.Namespace, marker: str, program: str, heads: str,
                          architecture: Sequence[str]) -> list[str]:
    """The problems of the trained checkpoint a dense program resumes or evaluates (``weights_to_evaluate``):
    one written by another program (``marker``: a flag only ``program`` stores; ``heads``: what
    that other checkpoint lacks, e.g. 'detection heads'), and architecture flags given on the
    command line that contradict the ones it stores (parse took the stored ones as defaults).
    Also the refusal of ``--eval`` without weights."""
    import models
    source = weights_to_evaluate(flags)
    flag = "--resume" if getattr(flags, "resume", "") else "--finetune"
    if flags.eval and not source and not getattr(flags, "random_weights", False):
        return [f"--eval needs the weights to evaluate: --resume OUTPUT_DIR/checkpoint-best.pth (a checkpoint "
                f"written by {program}); --random_weights evaluates an untrained model on purpose"]
    stored = getattr(flags, "stored", None)
    if not source or not Path(source).is_file() or (flags.eval and getattr(flags, "random_weights", False)):
        return []
    if stored is None or marker not in stored:
        name = (stored or {}).get("model")
        kind = ("a pretraining checkpoint" if isinstance(name, str) and name in models.list_models(task="pretrain")
                else "a classifier checkpoint" if isinstance(name, str) and models.is_model(name)
                else "not a checkpoint written by " + program)
        of = f" of {name}" if kind != "not a checkpoint written by " + program and name else ""
        what = f"{flag} {source} is {kind}{of}: it holds no {heads}"
        if flags.eval:
            return [f"{what}, so --eval would score untrained heads. Evaluate a checkpoint written by {program} "
                    f"(OUTPUT_DIR/checkpoint-best.pth or checkpoint-last.pth), or train from these weights with "
                    f"--finetune {source} (without --eval)"]
        return [f"{what}: start a training run from its weights with --finetune {source} (--resume continues a "
                f"run of {program})"]
    given = [k for k in architecture if k in stored and _plain(stored[k]) != _plain(getattr(flags, k, None))]
    if given:
        theirs = " ".join(f"--{k} {_shown(stored[k])}" for k in given)
        yours = " ".join(f"--{k} {_shown(getattr(flags, k))}" for k in given)
        return [f"{flag} {source} was trained with {theirs}, but the command line gives {yours}: drop these "
                f"flags (the checkpoint's own are used)"]
    return []


def dense_backbone(name: str, img_size: Optional[int] = None):
    """(contract, problem) of ``--model`` in a dense program: a classifier with a feature pyramid gives its
    contract (described on the meta device, at ``img_size`` when given) and ''; anything else None and
    the line naming the valid backbones (listing them describes every classifier: only on this path)."""
    import models
    if name in models.list_models(task="classify"):
        try:
            contract = models.describe(name, num_classes=0, **({} if img_size is None else {"img_size": img_size}))
        except ValueError as e:
            return None, f"--input_size {img_size}: {e}"
        if contract.pyramid is not None:
            return contract, ""
        return None, (f"--model {name} is a classifier without a feature pyramid for dense prediction; valid "
                      f"backbones: {', '.join(dense_models())}")
    hint = ""
    if name in models.list_models(task="pretrain"):
        hint = (f" (a pretraining model: its checkpoint's backbone is --model {models.classifier_for(name)}, loaded "
                f"with --finetune CHECKPOINT)")
    return None, unknown_choice("model", name, dense_models(), "valid backbones", hint)


@functools.lru_cache(maxsize=1)
def dense_models() -> list[str]:
    """The classifiers a dense program accepts (models.dense.dense_models, computed once per process)."""
    from models.dense import dense_models as listed
    return listed()


def _plain(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _shown(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def load_recipe(path: str, known: Iterable[str]) -> dict:
    """A recipe: a YAML file of ``flag: value`` lines (recipes/), or a checkpoint, whose stored flags
    rebuild the run it was written by. A key that is no flag of the program is an error in a
    recipe and ignored in a checkpoint (which also keeps facts found while resolving)."""
    known = set(known)
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path} does not exist")
    if p.suffix in (".pth", ".pt"):
        stored = checkpoint_flags(path)
        if stored is None:
            raise UsageError(f"--config {path}: the checkpoint keeps no flags ('config' or 'args')")
        return {k: v for k, v in stored.items() if k in known and k != "config"}
    import yaml
    try:
        recipe = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {path}: a recipe is a mapping of flag: value lines")
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise UsageError(f"--config {path}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a flag "
                         f"of this program; valid: {', '.join(sorted(known - {'config', 'help'}))}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()}


def write_recipe(config, rank: int = 0) -> Optional[Path]:
    """Rank 0 writes the resolved config as a recipe beside the outputs (``config.yaml``: its flags),
    so that ``--config OUTPUT_DIR/config.yaml`` runs it again."""
    if rank != 0:
        return None
    import yaml
    path = Path(config.output_dir) / "config.yaml"
    values = dataclasses.asdict(config)
    recipe = {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in flag_fields(type(config))}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("# the resolved flags of this run: python <program> --config this-file runs it again\n"
                   + yaml.safe_dump(recipe, sort_keys=False))
    tmp.replace(path)
    return path


def run_main(fn: Callable[[], int]) -> None:
    """Run a program's main and exit with its status. Usage and checkpoint errors, unusable data
    (``DataError``, also when a DataLoader worker found it) and file-system errors naming their file
    become one line on stderr; any other error keeps its traceback. Whatever the ending, DataLoader
    workers still alive are ended (``engine.stop.end_workers``): they ignore SIGTERM, and the process
    would otherwise wait for them for ever at exit."""
    from engine.stop import end_workers
    prog = os.path.basename(sys.argv[0])
    rank = os.environ.get("RANK")
    where = f"rank {rank}: " if rank is not None else ""
    try:
        code = fn()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    except CheckpointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # Ctrl-C before the stop handlers were installed: nothing trained yet
        print(f"{prog}: interrupted before training started; nothing to save", file=sys.stderr)
        code = 130
    except DataError as e:
        print(f"{prog}: {where}error: {error_line(e)}", file=sys.stderr, flush=True)
        code = 1
    except OSError as e:
        if not e.filename:  # not about a file: an unexpected failure, whose traceback is wanted
            end_workers()
            raise
        print(f"{prog}: {where}error: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception:
        if rank is not None:  # a rank's failure reaches the log with its rank number
            print(f"{prog}: rank {rank} failed:", file=sys.stderr, flush=True)
        end_workers()  # before the traceback is printed: it holds the DataLoader iterator alive
        raise
    end_workers()
    sys.exit(code)
