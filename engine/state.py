"""Saving and resuming the full training state, shared by every program.

A checkpoint is the reference's layout (``model``, ``optimizer``, ``epoch``,
``scaler``, ``args``: the run's flags) plus ``config`` (the same flags as a plain dict,
which loads with ``weights_only=True`` alone), ``model_name``, ``progress`` and, for a
run stopped mid-epoch, ``next_step``. An "epoch" here is the Trainer's period (an
epoch, or segmentation's evaluation interval): ``epoch`` is the last completed period,
or the period in progress when ``next_step`` (a micro-step) is set. ``progress`` records what a resume needs to
continue at the right sample under another batch size or world size: samples
consumed in the epoch, batch size, world size, accumulation, and the timeline
(see engine.checkpoint.progress_key).

Write order at the end of an epoch: ``checkpoint-{epoch}.pth`` (when due) and
``checkpoint-best.pth``, then ``checkpoint-last.pth``, then the epoch's
``log.txt`` line. Each checkpoint carries that line, so a kill before it was
written is repaired on resume; a kill at any other point leaves every file
whole (engine.checkpoint.save_atomic). An epoch that evaluates is first saved to
``checkpoint-last.pth`` alone, marked ``evaluation_pending`` (its training statistics);
a resume from that file runs the evaluation before the next epoch (engine.trainer.Trainer).

For tar shards, ``data`` records the training shards (``ShardImages.fingerprint``: names,
samples and sizes, and their digest, also in the sidecar): a resume on other shards is named,
and refused mid-epoch, where the recorded position would mean other samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from engine import checkpoint as ckpt_util
from engine.distributed import is_main_process
from engine.safe_archive import check_optimizer_state, expect_model
from errors import CheckpointError, UsageError


_PLAIN = (bool, int, float, str)

# Flags that shape a run: a resume with another value changes what is being trained, so it is refused
# unless asked for (--allow_changed_args, or an explicit --resume PATH). Compared where both runs have them.
# The programs' configs mark these fields with ``shaping()`` and register them (``register_shaping``).
RUN_SHAPING: dict[str, None] = {}


def shaping(**kwargs) -> dataclasses.Field:
    """A config field that shapes the run (its value is compared on resume)."""
    return dataclasses.field(metadata={"run_shaping": True}, **kwargs)


def register_shaping(cls):
    """Class decorator (above ``@dataclass``): the fields ``cls`` marks with ``shaping()`` join RUN_SHAPING."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("run_shaping"):
            RUN_SHAPING[f.name] = None
    return cls


class RunFlags(argparse.Namespace):
    """A run's flags as its checkpoints keep them (the reference's ``args``: plain values by flag
    name), and the timeline its checkpoints are written on, which resuming sets."""

    @classmethod
    def of(cls, config, **more) -> "RunFlags":
        """The flags of a resolved config (a dataclass whose fields are named after the flags), and
        ``more`` (segmentation: ``epochs``, its number of evaluation intervals)."""
        return cls(**dataclasses.asdict(config), **more, timeline=0)


def _plain(v) -> bool:
    """Exactly the builtin types (an IntEnum such as signal.Signals would need unsafe unpickling)."""
    return v is None or type(v) in _PLAIN or (type(v) in (list, tuple) and all(type(x) in _PLAIN for x in v))


def _world(flags) -> int:
    return int(getattr(flags, "world_size", 1) or 1)


def effective_batch(flags) -> int:
    return flags.batch_size * max(1, getattr(flags, "accum_iter", 1)) * _world(flags)


def save_training_state(flags, epoch: int, model, optimizer, scaler, next_step: int = 0, numbered: bool = False,
                        extra_names: tuple[str, ...] = (), extra: Optional[dict] = None,
                        log_record: Optional[dict] = None, append_log: bool = True,
                        evaluation_pending: Optional[dict] = None) -> None:
    """Rank 0 writes ``checkpoint-{epoch}.pth`` (when ``numbered``) and ``extra_names``, then
    ``checkpoint-last.pth``, then ``log_record`` as a line of log.txt (unless ``append_log`` is off:
    the checkpoint still carries it); every file atomically. ``evaluation_pending``: the epoch's
    training statistics, when its evaluation is still to run."""
    if not is_main_process():
        return
    world = _world(flags)
    progress = {"epoch": epoch, "next_step": next_step, "samples": next_step * flags.batch_size * world,
                "batch_size": flags.batch_size, "world_size": world, "accum_iter": max(1, flags.accum_iter),
                "timeline": int(getattr(flags, "timeline", 0)), "model_name": flags.model,
                "threads": torch.get_num_threads(),
                "finished": not next_step and evaluation_pending is None and epoch + 1 >= flags.epochs}
    plain = {k: v for k, v in vars(flags).items() if _plain(v)}
    data = getattr(flags, "data_fingerprint", None)
    if isinstance(data, dict):
        progress["data_digest"] = data["digest"]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict() if scaler is not None else {},
             "args": argparse.Namespace(**plain), "config": plain, "model_name": flags.model, "progress": progress}
    if next_step:
        state["next_step"] = next_step
    if log_record is not None:
        state["log_record"] = log_record
    if evaluation_pending is not None:
        state["evaluation_pending"] = {"stats": dict(evaluation_pending)}
    if isinstance(data, dict):
        state["data"] = data
    if extra:
        state.update(extra)
    out = Path(flags.output_dir)
    if numbered:
        ckpt_util.save_atomic(state, out / f"checkpoint-{epoch}.pth", meta=progress)
    for name in extra_names:
        ckpt_util.save_atomic(state, out / name)
    ckpt_util.save_atomic(state, out / ckpt_util.LAST_NAME, meta=progress)
    if log_record is not None and append_log:
        with open(out / "log.txt", "a") as f:
            f.write(json.dumps(log_record) + "\n")
    if numbered:
        ckpt_util.prune_checkpoints(out, flags.keep_last)


def _misfit(ckpt: dict, model, optimizer) -> Optional[str]:
    """Why a loaded checkpoint cannot be resumed into this model and optimizer (None: it fits)."""
    for key in ("epoch", "next_step"):
        if key in ckpt and type(ckpt[key]) is not int:
            return f"field {key!r} is a {type(ckpt[key]).__name__}, not an int"
    weights = ckpt["model"]
    if not isinstance(weights, dict):
        return f"field 'model' is a {type(weights).__name__}, not a state dict"
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and getattr(weights[k], "shape", None) != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:3])})")
    for k in shapes[:3]:
        problems.append(f"{k} has shape {tuple(getattr(weights[k], 'shape', ()))}, the model {tuple(own[k].shape)}")
    if problems:
        return "weights do not fit the model: " + "; ".join(problems)
    opt = ckpt.get("optimizer")
    if optimizer is not None and opt:
        groups = opt.get("param_groups") if isinstance(opt, dict) else None
        mine = optimizer.state_dict()["param_groups"]
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups if isinstance(g, dict)] != \
                [len(g["params"]) for g in mine]:
            return "optimizer state does not fit this model's parameter groups"
    return None


def _check_model(path: Path, ckpt: dict, model_name: str) -> None:
    stored = ckpt.get("model_name") or getattr(ckpt.get("args"), "model", None)
    if stored and stored != model_name:
        raise CheckpointError(
            f"{path} is a checkpoint of {stored}, not --model {model_name}: use another --output_dir, "
            f"or --model {stored} to continue that run")


def changed_args(saved, flags) -> list[str]:
    """The run-shaping flags whose values differ between the saved run and this one."""
    diffs = []
    for k in RUN_SHAPING:
        if hasattr(saved, k) and hasattr(flags, k) and getattr(saved, k) != getattr(flags, k):
            diffs.append(f"--{k} {getattr(saved, k)} -> {getattr(flags, k)}")
    if all(hasattr(saved, k) for k in ("batch_size", "accum_iter")):
        a, b = effective_batch(saved), effective_batch(flags)
        if a != b:
            diffs.append(f"effective batch {a} -> {b} (batch_size x accum_iter x world_size)")
    return diffs


def _start_step(ckpt: dict, flags, path: Path) -> int:
    """The step of this run's epoch that follows the samples the checkpoint consumed mid-epoch."""
    step = int(ckpt["next_step"])
    saved_args = ckpt.get("args")
    prog = ckpt.get("progress") if isinstance(ckpt.get("progress"), dict) else {}
    old_batch = prog.get("batch_size", getattr(saved_args, "batch_size", flags.batch_size))
    old_world = prog.get("world_size", getattr(saved_args, "world_size", 1) or 1)
    samples = int(prog.get("samples") or step * old_batch * old_world)
    per_step = flags.batch_size * _world(flags)
    accum = max(1, flags.accum_iter)
    if samples % per_step == 0 and (samples // per_step) % accum == 0:
        return samples // per_step
    raise CheckpointError(
        f"{path} stopped mid-epoch {ckpt['epoch']} after {samples} samples ({old_batch} per process x "
        f"{old_world} processes x {step} steps); --batch_size {flags.batch_size} x {_world(flags)} processes "
        f"(accum {accum}) cannot continue exactly there: resume with a batch size and world size whose "
        f"global batch times --accum_iter divides {samples} (e.g. the saved {old_batch} x {old_world}), or "
        f"move that file away to resume from the last end-of-epoch checkpoint")


def _repair_log(ckpt: dict, out: Path, log) -> None:
    """Append the epoch's log line if a kill after the checkpoint prevented it."""
    record = ckpt.get("log_record")
    if not isinstance(record, dict) or "epoch" not in record:
        return
    path = out / "log.txt"
    epochs = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                epochs.add(json.loads(line).get("epoch"))
            except (ValueError, AttributeError):
                continue
    if record["epoch"] not in epochs:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"log.txt: restored the line of epoch {record['epoch']} from the checkpoint", flush=True)


def describe_data_change(saved: dict, now: dict) -> str:
    """What differs between two shard fingerprints, naming shards where both lists are known."""
    old_rows, new_rows = saved.get("list"), now.get("list")
    if isinstance(old_rows, list) and isinstance(new_rows, list):
        before = {r[0]: tuple(r[1:]) for r in old_rows if isinstance(r, (list, tuple)) and r}
        after = {r[0]: tuple(r[1:]) for r in new_rows}
        parts = []
        for label, names in (("added", [n for n in after if n not in before]),
                             ("removed", [n for n in before if n not in after]),
                             ("changed", [n for n in after if n in before and after[n] != before[n]])):
            if names:
                parts.append(f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        if not parts and [r[0] for r in old_rows] != [r[0] for r in new_rows]:
            parts.append("the same shards in another order")
        if parts:
            return "; ".join(parts)
    return (f"{saved.get('shards')} shards of {saved.get('samples')} samples then, {now.get('shards')} of "
            f"{now.get('samples')} now")


def _check_data(ckpt: dict, flags, path: Path, explicit: bool, log) -> None:
    """Name a resume on other training shards; refuse it mid-epoch unless asked (the position it
    records would mean other samples)."""
    saved, now = ckpt.get("data"), getattr(flags, "data_fingerprint", None)
    if not isinstance(saved, dict) or not isinstance(now, dict) or saved.get("digest") == now.get("digest"):
        return
    change = describe_data_change(saved, now)
    if ckpt.get("next_step") and not (explicit or getattr(flags, "allow_changed_args", False)):
        raise UsageError(f"{path} stopped mid-epoch {ckpt['epoch']} on other training shards ({change}): its "
                         f"position would now mean other samples. Restore the shards, resume from the last "
                         f"end-of-epoch checkpoint (move {path.name} away), or continue anyway with "
                         f"--allow_changed_args")
    log(f"warning: the training shards changed since {path.name} was written: {change}"
        + ("; continuing mid-epoch at the same sample count" if ckpt.get("next_step") else ""), flush=True)


def _note_thread_count(progress: dict, flags, path: Path, log) -> None:
    """On a CPU, the intra-op thread count decides how sums and matrix products are split: a run
    resumed under another count continues correctly, but not bit for bit like the uninterrupted run."""
    saved = progress.get("threads")
    if saved is None or not str(getattr(flags, "device", "cpu")).startswith("cpu"):
        return
    now = torch.get_num_threads()
    if int(saved) != now:
        log(f"note: {path.name} was written with {saved} intra-op threads and this run uses {now}: training "
            f"continues correctly, but the weights will differ in the last bits from a run that never "
            f"stopped (set OMP_NUM_THREADS={saved} for a bit-identical continuation)", flush=True)


def resume_training_state(flags, model, optimizer, scaler, log=print,
                          position: Optional[Callable[[int, int], str]] = None) -> tuple[int, int, Optional[dict]]:
    """Restore from --resume, or the checkpoint in --output_dir with the most progress that fits (--auto_resume).
    ``position(period, step)`` names where the run continues in the program's unit
    (engine.trainer.Periods.position; default: epochs and steps).

    Returns (start_epoch, start_step, checkpoint or None). No RNG state is needed: the
    training loop reseeds the global RNGs at every optimizer step (engine.step.seed_rngs).
    Another model's checkpoint, and (for auto-resume, unless --allow_changed_args) changed
    run-shaping flags, are one-line errors.
    """
    expect_model(model)  # checkpoint size limits scale with this model
    out = Path(flags.output_dir)
    if is_main_process():
        stale = ckpt_util.remove_stale_temps(out)
        if stale:
            log(f"removed {len(stale)} temporary file(s) left by an interrupted checkpoint write: "
                f"{', '.join(p.name for p in stale)}", flush=True)
    if not is_main_process():
        log = lambda *a, **k: None  # noqa: E731  (rank 0 speaks for all)
    sides = [ckpt_util.read_sidecar(p) for p in ckpt_util.list_checkpoints(out)]
    timelines = [int(s["current"].get("timeline") or 0) for s in sides if s]
    found = None
    explicit = bool(flags.resume)

    def check(path: Path, ckpt: dict) -> Optional[str]:
        _check_model(path, ckpt, flags.model)
        return _misfit(ckpt, model, optimizer)

    if explicit:
        path = Path(flags.resume)
        ckpt_util.verify(path)
        ckpt = ckpt_util.safe_load(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
            raise CheckpointError(f"{path} is not a training checkpoint (no 'model' and 'epoch'); to "
                                            f"start from its weights use --finetune (finetuning) or --load_from "
                                            f"(pretraining)")
        reason = check(path, ckpt)
        if reason:
            raise CheckpointError(f"{path} cannot be resumed: {reason}")
        found = (path, ckpt)
    elif flags.auto_resume:
        found = ckpt_util.load_latest(out, log=lambda m: log(m, flush=True), check=check)
    if found is None:
        flags.timeline = max(timelines, default=-1) + 1 if timelines else 0
        return flags.start_epoch, 0, None
    path, ckpt = found
    saved_args = ckpt.get("args")
    diffs = changed_args(saved_args, flags) if isinstance(saved_args, argparse.Namespace) else []
    if diffs:
        listing = "; ".join(diffs)
        if explicit or getattr(flags, "allow_changed_args", False):
            log(f"warning: resuming {path} with changed flags: {listing}", flush=True)
        else:
            raise UsageError(f"{path} was written with other run-shaping flags: {listing}. Resume with the "
                             f"same flags, or continue with the new ones with --allow_changed_args (or an "
                             f"explicit --resume {path})")
    _check_data(ckpt, flags, path, explicit, log)
    prog = ckpt.get("progress") if isinstance(ckpt.get("progress"), dict) else {}
    saved_timeline = int(prog.get("timeline") or 0)
    # an explicit --resume starts a branch that outranks every file already in --output_dir
    flags.timeline = max(timelines + [saved_timeline]) + 1 if explicit else saved_timeline
    _note_thread_count(prog, flags, path, log)
    if ckpt.get("next_step"):
        epoch, step = int(ckpt["epoch"]), _start_step(ckpt, flags, path)
    else:
        epoch, step = int(ckpt["epoch"]) + 1, 0
    model.load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        check_optimizer_state(ckpt["optimizer"], optimizer, path)
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    pending = ckpt.get("evaluation_pending") if not ckpt.get("next_step") else None
    if is_main_process() and not isinstance(pending, dict):  # (a pending evaluation writes the line itself)
        _repair_log(ckpt, out, log)
    if position is not None:  # another unit than epochs (segmentation: iterations)
        if isinstance(pending, dict):
            log(f"resumed from {path} (trained to {position(epoch, 0)}, its evaluation interrupted: it runs "
                f"first)", flush=True)
        elif epoch >= flags.epochs:
            log(f"run already finished: {path} holds {position(epoch, 0)}; nothing to train", flush=True)
        else:
            log(f"resumed from {path} (continuing at {position(epoch, step)})", flush=True)
    elif isinstance(pending, dict):
        log(f"resumed from {path} (epoch {epoch - 1} trained, its evaluation interrupted: it runs first; then "
            f"continuing at epoch {epoch}, step 0)", flush=True)
    elif epoch >= flags.epochs:
        log(f"run already finished: {path} holds epoch {epoch - 1}, the last of --epochs {flags.epochs}; "
            f"nothing to train", flush=True)
    else:
        log(f"resumed from {path} (continuing at epoch {epoch}, step {step})", flush=True)
    return epoch, step, ckpt


def weights_digest(model: torch.nn.Module) -> str:
    """A short fingerprint of the weights (SHA-256 of names and bytes): ranks, and runs, compare it."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


LR_WINDOW_KEY = "rollback_lr_window"   # the checkpoint field of TrainState.lr_window


class TrainState:
    """What a checkpoint holds, and where the run stands: the model (``train_model``: the same one
    wrapped for training, DDP / compiled), optimizer, scaler (fp16 only), the position (``epoch``
    and ``step``: the period and the micro-step in it to continue at) and the best score
    (``best_key``: its checkpoint field; empty: none is kept).

    ``flags``: the run's flags record (RunFlags), which every checkpoint stores as ``args``."""

    def __init__(self, flags, model: torch.nn.Module, optimizer, scaler, best_key: str = "",
                 data: Optional[dict] = None) -> None:
        self.flags, self.model, self.optimizer, self.scaler = flags, model, optimizer, scaler
        self.train_model = model
        self.epoch, self.step = int(flags.start_epoch), 0
        self.best_key, self.best, self.best_epoch = best_key, 0.0, None
        self.checkpoint: Optional[dict] = None
        # a trained period whose evaluation a crash or kill interrupted: {"epoch", "stats"} (resume sets it)
        self.pending_evaluation: Optional[dict] = None
        # after a rollback with --rollback_lr_scale: {"start", "end", "scale"}, global micro-steps [start, end)
        self.lr_window: Optional[dict] = None
        if data is not None:  # the training shards' fingerprint (imagedata.shards.ShardImages.fingerprint)
            flags.data_fingerprint = data

    def resume(self, log: Callable = print, position: Optional[Callable[[int, int], str]] = None) -> Optional[dict]:
        """Continue from --resume or the newest good checkpoint (see resume_training_state); the best
        score comes back with it. Returns the checkpoint (None: a fresh start)."""
        self.epoch, self.step, self.checkpoint = resume_training_state(self.flags, self.model, self.optimizer,
                                                                       self.scaler, log=log, position=position)
        if self.checkpoint is not None and self.best_key:
            self.best = float(self.checkpoint.get(self.best_key, 0.0))
        window = self.checkpoint.get(LR_WINDOW_KEY) if self.checkpoint is not None else None
        self.lr_window = dict(window) if isinstance(window, dict) else None
        pending = self.checkpoint.get("evaluation_pending") if self.checkpoint is not None else None
        if isinstance(pending, dict) and not self.checkpoint.get("next_step"):
            self.pending_evaluation = {"epoch": self.epoch - 1, "stats": dict(pending.get("stats") or {})}
        return self.checkpoint

    def fields(self) -> dict:
        """What every checkpoint of the run carries beyond the training state, a stopped run's too."""
        fields = {self.best_key: self.best} if self.best_key else {}
        if self.lr_window is not None:
            fields[LR_WINDOW_KEY] = dict(self.lr_window)
        return fields

    def lr_factor(self, step: int) -> float:
        """The factor on the schedule's lr at global micro-step ``step`` (a rollback's window, else 1)."""
        w = self.lr_window
        return float(w["scale"]) if w is not None and w["start"] <= step < w["end"] else 1.0

    def save(self, epoch: int, next_step: int = 0, numbered: bool = False, log_record: Optional[dict] = None,
             extra: Optional[dict] = None, extra_names: tuple[str, ...] = (), append_log: bool = True,
             evaluation_pending: Optional[dict] = None) -> None:
        save_training_state(self.flags, epoch, self.model, self.optimizer, self.scaler, next_step=next_step,
                            numbered=numbered, extra_names=extra_names, extra={**self.fields(), **(extra or {})},
                            log_record=log_record, append_log=append_log, evaluation_pending=evaluation_pending)
