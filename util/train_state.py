"""Saving and resuming the full training state, shared by every program.

A checkpoint is the reference's layout (``model``, ``optimizer``, ``epoch``,
``scaler``, ``args``) plus ``model_name``, ``progress`` and, for a run stopped
mid-epoch, ``next_step``. ``epoch`` is the last completed epoch, or the epoch in
progress when ``next_step`` is set. ``progress`` records what a resume needs to
continue at the right sample under another batch size or world size: samples
consumed in the epoch, batch size, world size, accumulation, and the timeline
(see util.checkpoint.progress_key).

Write order at the end of an epoch: ``checkpoint-{epoch}.pth`` (when due) and
``checkpoint-best.pth``, then ``checkpoint-last.pth``, then the epoch's
``log.txt`` line. Each checkpoint carries that line, so a kill before it was
written is repaired on resume; a kill at any other point leaves every file
whole (util.checkpoint.save_atomic). An epoch that evaluates is first saved to
``checkpoint-last.pth`` alone, marked ``evaluation_pending`` (its training statistics);
a resume from that file runs the evaluation before the next epoch (util.run.run_epochs).

For tar shards, ``data`` records the training shards (``ShardImages.fingerprint``: names,
samples and sizes, and their digest, also in the sidecar): a resume on other shards is named,
and refused mid-epoch, where the recorded position would mean other samples.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt_util
from .distributed import is_main_process


_PLAIN = (bool, int, float, str)

# Flags that shape a run: a resume with another value changes what is being trained, so it is refused
# unless asked for (--allow_changed_args, or an explicit --resume PATH). Compared where both runs have them.
RUN_SHAPING = ("input_size", "epochs", "warmup_epochs", "lr", "blr", "min_lr", "weight_decay", "mask_ratio",
               "mask_regular", "vis_mask_ratio", "norm_pix_loss", "finetune", "load_from", "layer_decay",
               "drop_path", "linprobe", "nb_classes")


def _plain(v) -> bool:
    """Exactly the builtin types (an IntEnum such as signal.Signals would need unsafe unpickling)."""
    return v is None or type(v) in _PLAIN or (type(v) in (list, tuple) and all(type(x) in _PLAIN for x in v))


def _world(args) -> int:
    return int(getattr(args, "world_size", 1) or 1)


def effective_batch(args) -> int:
    return args.batch_size * max(1, getattr(args, "accum_iter", 1)) * _world(args)


def save_training_state(args, epoch: int, model, optimizer, scaler, next_step: int = 0, numbered: bool = False,
                        extra_names: tuple[str, ...] = (), extra: Optional[dict] = None,
                        log_record: Optional[dict] = None, append_log: bool = True,
                        evaluation_pending: Optional[dict] = None) -> None:
    """Rank 0 writes ``checkpoint-{epoch}.pth`` (when ``numbered``) and ``extra_names``, then
    ``checkpoint-last.pth``, then ``log_record`` as a line of log.txt (unless ``append_log`` is off:
    the checkpoint still carries it); every file atomically. ``evaluation_pending``: the epoch's
    training statistics, when its evaluation is still to run."""
    if not is_main_process():
        return
    world = _world(args)
    progress = {"epoch": epoch, "next_step": next_step, "samples": next_step * args.batch_size * world,
                "batch_size": args.batch_size, "world_size": world, "accum_iter": max(1, args.accum_iter),
                "timeline": int(getattr(args, "timeline", 0)), "model_name": args.model,
                "finished": not next_step and evaluation_pending is None and epoch + 1 >= args.epochs}
    data = getattr(args, "data_fingerprint", None)
    if isinstance(data, dict):
        progress["data_digest"] = data["digest"]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict() if scaler is not None else {},
             "args": argparse.Namespace(**{k: v for k, v in vars(args).items() if _plain(v)}),
             "model_name": args.model, "progress": progress}
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
    out = Path(args.output_dir)
    if numbered:
        ckpt_util.save_atomic(state, out / f"checkpoint-{epoch}.pth", meta=progress)
    for name in extra_names:
        ckpt_util.save_atomic(state, out / name)
    ckpt_util.save_atomic(state, out / ckpt_util.LAST_NAME, meta=progress)
    if log_record is not None and append_log:
        with open(out / "log.txt", "a") as f:
            f.write(json.dumps(log_record) + "\n")
    if numbered:
        ckpt_util.prune_checkpoints(out, args.keep_last)


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
        raise ckpt_util.CheckpointError(
            f"{path} is a checkpoint of {stored}, not --model {model_name}: use another --output_dir, "
            f"or --model {stored} to continue that run")


def changed_args(saved, args) -> list[str]:
    """The run-shaping flags whose values differ between the saved run and this one."""
    diffs = []
    for k in RUN_SHAPING:
        if hasattr(saved, k) and hasattr(args, k) and getattr(saved, k) != getattr(args, k):
            diffs.append(f"--{k} {getattr(saved, k)} -> {getattr(args, k)}")
    if all(hasattr(saved, k) for k in ("batch_size", "accum_iter")):
        a, b = effective_batch(saved), effective_batch(args)
        if a != b:
            diffs.append(f"effective batch {a} -> {b} (batch_size x accum_iter x world_size)")
    return diffs


def _start_step(ckpt: dict, args, path: Path) -> int:
    """The step of this run's epoch that follows the samples the checkpoint consumed mid-epoch."""
    step = int(ckpt["next_step"])
    saved_args = ckpt.get("args")
    prog = ckpt.get("progress") if isinstance(ckpt.get("progress"), dict) else {}
    old_batch = prog.get("batch_size", getattr(saved_args, "batch_size", args.batch_size))
    old_world = prog.get("world_size", getattr(saved_args, "world_size", 1) or 1)
    samples = int(prog.get("samples") or step * old_batch * old_world)
    per_step = args.batch_size * _world(args)
    accum = max(1, args.accum_iter)
    if samples % per_step == 0 and (samples // per_step) % accum == 0:
        return samples // per_step
    raise ckpt_util.CheckpointError(
        f"{path} stopped mid-epoch {ckpt['epoch']} after {samples} samples ({old_batch} per process x "
        f"{old_world} processes x {step} steps); --batch_size {args.batch_size} x {_world(args)} processes "
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


def _check_data(ckpt: dict, args, path: Path, explicit: bool, log) -> None:
    """Name a resume on other training shards; refuse it mid-epoch unless asked (the position it
    records would mean other samples)."""
    saved, now = ckpt.get("data"), getattr(args, "data_fingerprint", None)
    if not isinstance(saved, dict) or not isinstance(now, dict) or saved.get("digest") == now.get("digest"):
        return
    change = describe_data_change(saved, now)
    if ckpt.get("next_step") and not (explicit or getattr(args, "allow_changed_args", False)):
        from .cli import UsageError
        raise UsageError(f"{path} stopped mid-epoch {ckpt['epoch']} on other training shards ({change}): its "
                         f"position would now mean other samples. Restore the shards, resume from the last "
                         f"end-of-epoch checkpoint (move {path.name} away), or continue anyway with "
                         f"--allow_changed_args")
    log(f"warning: the training shards changed since {path.name} was written: {change}"
        + ("; continuing mid-epoch at the same sample count" if ckpt.get("next_step") else ""), flush=True)


def resume_training_state(args, model, optimizer, scaler, log=print) -> tuple[int, int, Optional[dict]]:
    """Restore from --resume, or the checkpoint in --output_dir with the most progress that fits (--auto_resume).

    Returns (start_epoch, start_step, checkpoint or None). No RNG state is needed: the
    training loop reseeds the global RNGs at every optimizer step (util.loop.seed_rngs).
    Another model's checkpoint, and (for auto-resume, unless --allow_changed_args) changed
    run-shaping flags, are one-line errors.
    """
    from .safe_archive import check_optimizer_state, expect_model
    expect_model(model)  # checkpoint size limits scale with this model
    out = Path(args.output_dir)
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
    explicit = bool(args.resume)

    def check(path: Path, ckpt: dict) -> Optional[str]:
        _check_model(path, ckpt, args.model)
        return _misfit(ckpt, model, optimizer)

    if explicit:
        path = Path(args.resume)
        ckpt_util.verify(path)
        ckpt = ckpt_util.safe_load(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
            raise ckpt_util.CheckpointError(f"{path} is not a training checkpoint (no 'model' and 'epoch'); to "
                                            f"start from its weights use --finetune (finetuning) or --load_from "
                                            f"(pretraining)")
        reason = check(path, ckpt)
        if reason:
            raise ckpt_util.CheckpointError(f"{path} cannot be resumed: {reason}")
        found = (path, ckpt)
    elif args.auto_resume:
        found = ckpt_util.load_latest(out, log=lambda m: log(m, flush=True), check=check)
    if found is None:
        args.timeline = max(timelines, default=-1) + 1 if timelines else 0
        return args.start_epoch, 0, None
    path, ckpt = found
    saved_args = ckpt.get("args")
    diffs = changed_args(saved_args, args) if isinstance(saved_args, argparse.Namespace) else []
    if diffs:
        listing = "; ".join(diffs)
        if explicit or getattr(args, "allow_changed_args", False):
            log(f"warning: resuming {path} with changed flags: {listing}", flush=True)
        else:
            from .cli import UsageError
            raise UsageError(f"{path} was written with other run-shaping flags: {listing}. Resume with the "
                             f"same flags, or continue with the new ones with --allow_changed_args (or an "
                             f"explicit --resume {path})")
    _check_data(ckpt, args, path, explicit, log)
    prog = ckpt.get("progress") if isinstance(ckpt.get("progress"), dict) else {}
    saved_timeline = int(prog.get("timeline") or 0)
    # an explicit --resume starts a branch that outranks every file already in --output_dir
    args.timeline = max(timelines + [saved_timeline]) + 1 if explicit else saved_timeline
    if ckpt.get("next_step"):
        epoch, step = int(ckpt["epoch"]), _start_step(ckpt, args, path)
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
    if isinstance(pending, dict):
        args.pending_evaluation = {"epoch": epoch - 1, "stats": dict(pending.get("stats") or {})}
        log(f"resumed from {path} (epoch {epoch - 1} trained, its evaluation interrupted: it runs first; then "
            f"continuing at epoch {epoch}, step 0)", flush=True)
    elif epoch >= args.epochs:
        log(f"run already finished: {path} holds epoch {epoch - 1}, the last of --epochs {args.epochs}; "
            f"nothing to train", flush=True)
    else:
        log(f"resumed from {path} (continuing at epoch {epoch}, step {step})", flush=True)
    return epoch, step, ckpt
