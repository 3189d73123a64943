"""Saving and resuming the full training state, shared by every program.

A checkpoint is the reference's layout (``model``, ``optimizer``, ``epoch``,
``scaler``, ``args``) plus ``model_name`` and, for a run stopped
mid-epoch, ``next_step``. ``epoch`` is the last completed epoch, or the epoch in
progress when ``next_step`` is set.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


from . import checkpoint as ckpt_util
from .distributed import is_main_process


_PLAIN = (bool, int, float, str)


def _plain(v) -> bool:
    """Exactly the builtin types (an IntEnum such as signal.Signals would need unsafe unpickling)."""
    return v is None or type(v) in _PLAIN or (type(v) in (list, tuple) and all(type(x) in _PLAIN for x in v))


def save_training_state(args, epoch: int, model, optimizer, scaler, next_step: int = 0, numbered: bool = False,
                        extra_names: tuple[str, ...] = (), extra: Optional[dict] = None) -> None:
    """Rank 0 writes ``checkpoint-last.pth`` (+ ``checkpoint-{epoch}.pth`` and ``extra_names``), atomically."""
    if not is_main_process():
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict() if scaler is not None else {},
             "args": argparse.Namespace(**{k: v for k, v in vars(args).items() if _plain(v)}),
             "model_name": args.model}
    if next_step:
        state["next_step"] = next_step
    if extra:
        state.update(extra)
    out = Path(args.output_dir)
    ckpt_util.save_atomic(state, out / ckpt_util.LAST_NAME)
    for name in extra_names:
        ckpt_util.save_atomic(state, out / name)
    if numbered:
        ckpt_util.save_atomic(state, out / f"checkpoint-{epoch}.pth")
        ckpt_util.prune_checkpoints(out, args.keep_last)


def resume_training_state(args, model, optimizer, scaler, log=print) -> tuple[int, int, Optional[dict]]:
    """Restore from --resume, or the newest good checkpoint in --output_dir (--auto_resume).

    Returns (start_epoch, start_step, checkpoint or None). No RNG state is needed: the
    training loop reseeds the global RNGs at every optimizer step (util.loop.seed_rngs).
    """
    from .safe_archive import check_optimizer_state, expect_model
    expect_model(model)  # checkpoint size limits scale with this model
    found = None
    if args.resume:
        found = (Path(args.resume), ckpt_util.safe_load(args.resume))
    elif args.auto_resume:
        found = ckpt_util.load_latest(args.output_dir, log=lambda m: log(m, flush=True))
    if found is None:
        return args.start_epoch, 0, None
    path, ckpt = found
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise ckpt_util.CheckpointError(f"{path} is not a training checkpoint (no 'model' and 'epoch'); to start "
                                        f"from its weights use --finetune (finetuning) or --load_from (pretraining)")
    model.load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        check_optimizer_state(ckpt["optimizer"], optimizer, path)
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("next_step"):
        epoch, step = int(ckpt["epoch"]), int(ckpt["next_step"])
    else:
        epoch, step = int(ckpt["epoch"]) + 1, 0
    log(f"resumed from {path} (continuing at epoch {epoch}, step {step})", flush=True)
    return epoch, step, ckpt


def finish_interrupted(exc: Exception, args, model, optimizer, scaler, stop, extra: Optional[dict] = None) -> int:
    """End a run cut short by the training loop; returns the exit status.

    StopRequested (a stop signal, honoured at a step boundary): write a mid-epoch checkpoint
    and exit 0. NonFiniteLossError: nothing is saved, the message names the last good
    checkpoint, exit 1.
    """
    import sys

    from .distributed import cleanup
    from .loop import StopRequested
    if isinstance(exc, StopRequested):
        args.stop_signal = int(stop.signum) if stop.signum is not None else None
        if exc.step == 0:  # stopped on the last step of epoch - 1: an ordinary end-of-epoch checkpoint
            save_training_state(args, exc.epoch - 1, model, optimizer, scaler, extra=extra)
        else:
            save_training_state(args, exc.epoch, model, optimizer, scaler, next_step=exc.step, extra=extra)
        if is_main_process():
            print(f"stop signal: checkpoint written at epoch {exc.epoch}, step {exc.step}; exiting", flush=True)
        cleanup()
        return 0
    good = ckpt_util.list_checkpoints(args.output_dir)
    print(f"error: {exc}; stopping. Last good checkpoint: {good[0] if good else 'none'}", file=sys.stderr, flush=True)
    cleanup()
    return 1
