"""Up-front checks of flag values: ranges, policy strings and paths, each failing with one line
that names the valid values, before any model, data or process group is built."""
from __future__ import annotations

import contextlib
import difflib
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from errors import UsageError


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# (test, description of the valid values)
NON_NEGATIVE = (lambda v: _finite(v) and v >= 0, "a finite number >= 0")
POSITIVE = (lambda v: _finite(v) and v > 0, "a finite number > 0")
UNIT = (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
UNIT_RIGHT_OPEN = (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)")
DECAY = (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1] (1: no decay)")


def at_least(k: int) -> tuple[Callable, str]:
    return (lambda v: v >= k, f"an integer >= {k}")


class Problems:
    """What is wrong with a command line, collected so that one message lists all of it.

        problems = Problems()
        with problems.check():      # a check that raises UsageError: its problems are kept
            check_ranges(flags, RULES)
        problems.add("--x 3 ...")   # a problem found directly
        problems.raise_any()        # UsageError.many(every problem), or nothing
    """

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        """Keep ``problem`` ('' is no problem)."""
        if problem and problem not in self.found:
            self.found.append(problem)

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except UsageError as e:
            for p in e.problems:
                self.add(p)

    def raise_any(self) -> None:
        if self.found:
            raise UsageError.many(self.found)


def check_ranges(args, rules: Iterable[tuple[str, tuple[Callable, str]]]) -> None:
    """``rules``: (flag, (test, valid)); a flag absent from ``args`` or set to None is skipped.
    Every flag out of range is named, in one error."""
    problems = []
    for flag, (ok, valid) in rules:
        value = getattr(args, flag, None)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(ok(v) for v in values):
            problems.append(f"--{flag} {' '.join(map(str, values))}: valid values are {valid}")
    if problems:
        raise UsageError.many(problems)


def unknown_choice(flag: str, value: str, valid: Sequence[str], what: str = "valid", hint: str = "",
                   limit: int = 40) -> str:
    """The line for a value that is none of ``valid``: the closest names first ("did you mean"),
    then the valid values (at most ``limit``, the rest counted); ``hint`` says more about ``value`` (and
    replaces the close names: it names the right one)."""
    close = [] if hint else difflib.get_close_matches(value, list(valid), n=3, cutoff=0.6)
    shown = list(valid)[:limit]
    rest = f", ... ({len(valid) - limit} more)" if len(valid) > limit else ""
    mean = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown --{flag} {value!r}{hint}{mean}; {what}: {', '.join(shown)}{rest}"


def check_existing(args, flags: Iterable[str], kind: str = "file") -> None:
    """Paths that must exist (checkpoints to read), checked before anything else."""
    for flag in flags:
        value = getattr(args, flag, None)
        if not value:
            continue
        p = Path(value)
        if kind == "file" and not p.is_file():
            what = "is a folder, not a checkpoint file" if p.is_dir() else "does not exist"
            raise UsageError(f"--{flag} {value} {what}")
        if kind == "dir" and not p.is_dir():
            raise UsageError(f"--{flag} {value} does not exist or is not a folder")


_AA_HELP = ("'none', rand-m9-mstd0.5-inc1 (RandAugment: sections m<magnitude>, n<ops>, mstd<std>, mmax<max>, "
            "inc<0|1>, p<prob>, t<transforms>), augmix-m5-w4-d2, original, originalr, v0, v0r or 3a")
_RAND_KEYS = {"m", "n", "mstd", "mmax", "inc", "p"}
_AUGMIX_KEYS = {"m", "w", "d", "a", "b", "mstd"}


def check_auto_augment(policy: Optional[str]) -> None:
    """Parse ``--aa`` with timm's own parser (the one create_transform calls), and refuse sections that
    timm would silently ignore (``rand-bogus`` trains without the intended policy)."""
    if policy is None:
        return
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    try:
        if policy.startswith("rand"):
            rand_augment_transform(policy, hparams)
            keys = _RAND_KEYS
        elif policy.startswith("augmix"):
            augment_and_mix_transform(policy, hparams)
            keys = _AUGMIX_KEYS
        else:
            auto_augment_transform(policy, hparams)
            keys = set()
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        detail = str(e).strip()
        raise UsageError(f"--aa {policy!r} is not a timm augmentation policy{f' ({detail})' if detail else ''}; "
                         f"valid: {_AA_HELP}") from None
    for section in policy.split("-")[1:] if keys else ():
        if keys is _RAND_KEYS and section.startswith("t"):
            continue
        parts = re.split(r"(\d.*)", section)
        if len(parts) < 2 or parts[0] not in keys:
            raise UsageError(f"--aa {policy!r}: section {section!r} means nothing to timm's parser (it would be "
                             f"ignored); valid: {_AA_HELP}")


COMMON_RULES = [
    ("num_workers", at_least(0)), ("clip_grad", NON_NEGATIVE), ("save_freq", at_least(0)),
    ("keep_last", at_least(0)), ("print_freq", at_least(1)), ("start_epoch", at_least(0)),
    ("world_size", at_least(1)), ("dist_timeout", POSITIVE), ("max_checkpoint_gb", POSITIVE),
    ("exit_after_epoch", at_least(-1)), ("max_skipped", at_least(-1)),
]

# flags of both training programs
TRAINING_RULES = [
    ("batch_size", at_least(1)), ("epochs", at_least(1)), ("accum_iter", at_least(1)),
    ("weight_decay", NON_NEGATIVE), ("lr", POSITIVE), ("blr", POSITIVE), ("min_lr", NON_NEGATIVE),
    ("warmup_epochs", at_least(0)), ("input_size", at_least(1)),
]
