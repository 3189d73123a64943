"""Bounded inspection of a checkpoint before and after ``torch.load(weights_only=True)``.

``weights_only`` stops pickled code from running, but some of what it allows still lets a
tiny file take unbounded memory or time. Everything here runs *before* anything is
allocated for the file's content, or, for the structure of the loaded object, in time
linear in the file:

* the file must be torch's zip format; a raw (or legacy) pickle is refused;
* every zip entry must be stored, not compressed (a 1.5 MB deflate entry can inflate to
  gigabytes); entries may not overlap; their number, each size and the total are bounded
  by a limit that scales with the model being loaded (``limit_bytes``; ``--max_checkpoint_gb``
  overrides it);
* ``data.pkl`` is read opcode by opcode (``pickletools``, nothing executed) and refused when
  it calls one of the functions torch's safe loader allows but a checkpoint never needs and
  that allocate memory the file does not hold (``bytearray(N)``, ``torch.FloatTensor(N)``,
  device copies and the like), or feeds a loaded object (a tensor view) to ``set``/``Counter``;
* after loading, the object graph is walked once: no cycles, bounded depth, bounded size
  when shared sub-structures are expanded (``Optimizer.load_state_dict`` copies every
  shared list once per reference: 512 bytes of pickle can mean 2**60 copies), and no
  tensor view larger than the limit;
* optimizer state is checked against the optimizer's own parameter groups before
  ``Optimizer.load_state_dict`` sees it (``check_optimizer_state``).

Every refusal is a ``CheckpointError`` of one line naming the file and the reason.
"""
from __future__ import annotations

import argparse
import io
import os
import pickletools
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

from errors import CheckpointError

GiB = 1 << 30
MiB = 1 << 20
FLOOR_BYTES = 256 * MiB          # smallest limit, whatever the model
MODEL_FACTOR = 8                 # a pretraining checkpoint holds encoder + decoder + 2 AdamW moments
UNKNOWN_MODEL_BYTES = 8 * GiB    # the limit when no model has been announced (library use, tools)
MAX_PICKLE_BYTES = 64 * MiB      # data.pkl of a 1000-tensor state dict is ~200 KB
MAX_ENTRIES = 200_000
MAX_DEPTH = 64                   # nesting of containers (a state dict is ~4 deep)
MAX_EXPANDED = 5_000_000         # objects after expanding shared sub-structures

_override_bytes: Optional[int] = None
_override_gb: Optional[float] = None
_expected_bytes: Optional[int] = None


def configure(max_checkpoint_gb: Optional[float] = None) -> None:
    """``--max_checkpoint_gb``: a fixed limit instead of the model-scaled one (None: scaled)."""
    global _override_bytes, _override_gb
    _override_gb = max_checkpoint_gb
    _override_bytes = None if max_checkpoint_gb is None else int(max_checkpoint_gb * GiB)


def expect_model(model: torch.nn.Module) -> None:
    """Announce the model that checkpoints will be loaded into; the limit scales with it."""
    global _expected_bytes
    _expected_bytes = model_bytes(model)


def model_bytes(model: torch.nn.Module) -> int:
    """fp32 bytes of a model's parameters and buffers (a meta model works too)."""
    return 4 * sum(t.numel() for t in list(model.parameters()) + list(model.buffers()))


def limit_bytes(expected: Optional[int] = None) -> tuple[int, str]:
    """(limit, how it was chosen) for the total size of one checkpoint file's entries."""
    if _override_bytes is not None:
        return _override_bytes, f"--max_checkpoint_gb {_override_gb:g}"
    expected = expected if expected is not None else _expected_bytes
    if expected is None:
        return UNKNOWN_MODEL_BYTES, (f"{UNKNOWN_MODEL_BYTES / GiB:g} GB when no model is known; "
                                     f"raise it with --max_checkpoint_gb")
    limit = max(FLOOR_BYTES, MODEL_FACTOR * expected)
    return limit, (f"{MODEL_FACTOR}x the model's {expected / MiB:.0f} MB of fp32 weights, at least "
                   f"{FLOOR_BYTES / MiB:.0f} MB; raise it with --max_checkpoint_gb")


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GB" if n >= GiB else f"{n / MiB:.1f} MB"


# --------------------------------------------------------------------------- the zip archive

def _central_directory(f, file_size: int) -> tuple[int, int]:
    """(entries, central directory bytes) from the end records, before zipfile parses anything."""
    tail_len = min(file_size, 65_557)  # end record (22) + the longest comment (65535)
    f.seek(file_size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise ValueError("no zip end record")
    _, _, _, _, entries, cd_size, _, _ = struct.unpack("<4s4H2LH", tail[at:at + 22])
    loc = tail.rfind(b"PK\x06\x07", 0, at)  # zip64 locator precedes the end record
    if loc >= 0 and at - loc == 20:
        (_, _, zip64_at, _) = struct.unpack("<4sLQL", tail[loc:loc + 20])
        if zip64_at + 56 <= file_size:
            f.seek(zip64_at)
            rec = f.read(56)
            if rec[:4] == b"PK\x06\x06":
                entries, cd_size = struct.unpack("<Q", rec[32:40])[0], struct.unpack("<Q", rec[40:48])[0]
    return entries, cd_size


def inspect_archive(path: Path, expected: Optional[int] = None) -> None:
    """Refuse a file whose archive could exhaust memory; see the module docstring."""
    limit, why = limit_bytes(expected)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if head[:2] != b"PK":
            if head[:1] == b"\x80":
                raise CheckpointError(
                    f"refused to load {path}: it is a raw pickle, not torch's zip checkpoint format; a raw pickle's "
                    f"size and content cannot be checked before it is unpickled. Re-save it with torch.save "
                    f"(torch >= 1.6) from its source")
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: not a zip archive "
                                  f"(torch's checkpoint format)")
        try:
            entries, cd_size = _central_directory(f, file_size)
        except (ValueError, struct.error, OSError) as e:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from None
        if entries > MAX_ENTRIES or cd_size > min(file_size, 100 * entries + 64 * MiB):
            raise CheckpointError(f"refused to load {path}: its archive lists {entries} entries "
                                  f"({_fmt(cd_size)} of directory); at most {MAX_ENTRIES} are accepted")
        try:
            infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as e:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {e}") from None
    total = 0
    pickle_info = None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"refused to load {path}: entry {info.filename} is compressed ({_method(info.compress_type)}, "
                f"{_fmt(info.compress_size)} inflating to {_fmt(info.file_size)}); torch.save writes stored entries, "
                f"and a compressed one could inflate without bound")
        if info.file_size > limit:
            raise CheckpointError(f"refused to load {path}: entry {info.filename} holds {_fmt(info.file_size)}, "
                                  f"over the limit of {_fmt(limit)} ({why})")
        total += info.file_size
        if info.filename.endswith("/data.pkl") or info.filename == "data.pkl":
            pickle_info = info
    if total > limit:
        raise CheckpointError(f"refused to load {path}: its entries hold {_fmt(total)}, over the limit of "
                              f"{_fmt(limit)} ({why})")
    if total > file_size:
        raise CheckpointError(f"refused to load {path}: its entries claim {_fmt(total)} but the file has "
                              f"{_fmt(file_size)} (overlapping or forged entries)")
    if pickle_info is None:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: no data.pkl in the archive")
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"refused to load {path}: its data.pkl is {_fmt(pickle_info.file_size)}, over "
                              f"{_fmt(MAX_PICKLE_BYTES)} (a state dict's is well under a megabyte)")
    with zipfile.ZipFile(path) as z:
        data = z.read(pickle_info)
    scan_pickle(data, path)


def _method(compress_type: int) -> str:
    return {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
            zipfile.ZIP_LZMA: "lzma"}.get(compress_type, f"method {compress_type}")


# --------------------------------------------------------------------------- the pickle opcodes

# Callables that a checkpoint calls while it is unpickled. torch's safe loader allows more
# (see torch._weights_only_unpickler), among them functions that allocate memory from a
# number in the file (bytearray(N), torch.FloatTensor(N)) or copy a view into a new tensor
# (_rebuild_device_tensor_from_cpu_tensor: a stride-0 view of 4 bytes can stand for 80 GB).
TENSOR_REBUILDERS = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
                     "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
                     "torch._utils._rebuild_parameter_with_state"}
LITERAL_ONLY = {"torch.device", "torch.Size", "_codecs.encode", "builtins.set", "builtins.complex",
                "collections.Counter", "collections.OrderedDict", "torch.serialization._get_layout",
                "argparse.Namespace"}
ALLOWED_CALLS = TENSOR_REBUILDERS | LITERAL_ONLY | {"torch._tensor._rebuild_from_type_v2"}
STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
              "BINUNICODE8"}


class _V:
    """What the scan knows of a value on the pickle stack."""
    __slots__ = ("kind", "name", "literal", "items")

    def __init__(self, kind: str, name: str = "", literal: bool = True, items: tuple = ()) -> None:
        self.kind, self.name, self.literal, self.items = kind, name, literal, items


_MARK = _V("mark")


def _torch_allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as wu
    return set(wu._get_allowed_globals()) | {"argparse.Namespace"}


def scan_pickle(data: bytes, path: Path) -> None:
    """Follow the pickle machine's stack symbolically (no object is built) and refuse calls
    that could allocate unbounded memory; unknown globals are refused as code."""
    allowed_globals = _torch_allowed_globals()
    stack: list[_V] = []
    memo: dict[int, _V] = {}

    def refuse(reason: str) -> None:
        raise CheckpointError(f"refused to load {path}: {reason}")

    def pop_mark() -> list[_V]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        refuse("its pickle is malformed (no MARK)")

    def pop() -> _V:
        if not stack:
            refuse("its pickle is malformed (stack underflow)")
        return stack.pop()

    def call(func: _V, args: _V) -> _V:
        if func.kind != "global":
            refuse("its pickle calls something that is not a named function")
        name = func.name
        if name not in ALLOWED_CALLS:
            refuse(f"it calls {name}, which torch's safe loader allows but a checkpoint never needs; it allocates "
                   f"memory or copies that the file does not hold (a small file can ask for gigabytes)")
        if name in LITERAL_ONLY and not args.literal:
            refuse(f"it calls {name} on a loaded object (e.g. iterating a tensor view that can stand for "
                   f"billions of elements); checkpoints pass it only plain values")
        if name == "torch._tensor._rebuild_from_type_v2":
            inner = args.items[0] if args.items else None
            if inner is None or inner.kind != "global" or inner.name not in TENSOR_REBUILDERS:
                refuse(f"it rebuilds a tensor subclass through "
                       f"{inner.name if inner is not None and inner.kind == 'global' else 'an unnamed function'}, "
                       f"which a checkpoint never needs")
        return _V("obj", literal=False)

    try:
        ops = pickletools.genops(io.BytesIO(data))
        for op, arg, _ in ops:
            n = op.name
            if n in ("PROTO", "FRAME"):
                continue
            if n == "STOP":
                return
            if n == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                module, name = _py3_name(module, name)
                stack.append(_global(module, name, allowed_globals, refuse))
            elif n == "STACK_GLOBAL":
                name, module = pop(), pop()
                if name.kind != "str" or module.kind != "str":
                    refuse("its pickle names a global with non-string parts")
                stack.append(_global(module.name, name.name, allowed_globals, refuse))
            elif n in ("INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"):
                refuse(f"its pickle uses the {n} opcode, which torch checkpoints never contain")
            elif n in STRING_OPS:
                stack.append(_V("str", name=arg if isinstance(arg, str) else ""))
            elif n == "MARK":
                stack.append(_MARK)
            elif n == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else refuse("its pickle is malformed (empty memo)")
            elif n in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1] if stack else refuse("its pickle is malformed (empty memo)")
            elif n in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    refuse("its pickle is malformed (unknown memo entry)")
                stack.append(memo[int(arg)])
            elif n == "REDUCE":
                args = pop()
                stack.append(call(pop(), args))
            elif n == "NEWOBJ":
                args = pop()
                stack.append(call(pop(), args))
            elif n == "NEWOBJ_EX":
                pop()
                args = pop()
                stack.append(call(pop(), args))
            elif n == "BINPERSID":
                pop()
                stack.append(_V("obj", literal=False))  # a storage: its bytes are a stored zip entry
            elif n == "BUILD":
                pop()
                if stack and stack[-1].kind not in ("obj",):
                    refuse("its pickle sets the state of something that is not an object")
            elif n in ("TUPLE", "LIST", "DICT", "FROZENSET"):
                items = pop_mark()
                stack.append(_V("container", literal=all(v.literal for v in items), items=tuple(items)))
            elif n in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(n[-1])
                items = [pop() for _ in range(k)][::-1]
                stack.append(_V("container", literal=all(v.literal for v in items), items=tuple(items)))
            elif n in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"):
                stack.append(_V("container"))
            elif n in ("APPEND", "SETITEM", "APPENDS", "SETITEMS", "ADDITEMS"):
                if n == "APPEND":
                    items = [pop()]
                elif n == "SETITEM":
                    items = [pop(), pop()]
                else:
                    items = pop_mark()
                if not stack:
                    refuse("its pickle is malformed (nothing to add items to)")
                if not all(v.literal for v in items):
                    stack[-1].literal = False
            elif n == "POP":
                pop()
            elif n == "POP_MARK":
                pop_mark()
            elif n == "DUP":
                stack.append(stack[-1] if stack else refuse("its pickle is malformed (DUP of nothing)"))
            else:  # numbers, None, booleans, bytes: plain values
                for _ in op.stack_before:
                    pop()
                for _ in op.stack_after:
                    stack.append(_V("value"))
        refuse("its pickle has no STOP opcode (truncated)")
    except CheckpointError:
        raise
    except Exception as e:  # pickletools' own errors on a damaged stream
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: its pickle does not parse "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol 2 writes Python 2 names (``__builtin__``); map them as torch's loader does."""
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING
    if (module, name) in NAME_MAPPING:
        return NAME_MAPPING[(module, name)]
    return IMPORT_MAPPING.get(module, module), name


def _global(module: str, name: str, allowed: set[str], refuse) -> _V:
    full = f"{module}.{name}"
    if full not in allowed:
        refuse(f"it needs a pickled object other than tensors, plain containers and argparse.Namespace, and "
               f"loading it could execute code (global {full})")
    return _V("global", name=full, literal=True)


# --------------------------------------------------------------------------- the loaded object

def check_loaded(obj: Any, path: Path, expected: Optional[int] = None) -> None:
    """Walk the loaded object once (iteratively): no cycle, nesting <= MAX_DEPTH, the tree with shared
    parts expanded <= MAX_EXPANDED objects, no tensor larger than the limit, Namespace attributes named."""
    limit, why = limit_bytes(expected)
    expanded: dict[int, int] = {}   # id -> size of its expanded tree
    keep: list = []                 # keeps ids valid during the walk
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(obj, 0, False)]

    def children(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield v
        elif isinstance(x, (list, tuple, set, frozenset)):
            yield from x
        elif isinstance(x, argparse.Namespace):
            yield from vars(x).values()

    while stack:
        x, depth, done = stack.pop()
        if isinstance(x, torch.Tensor):
            nbytes = x.numel() * x.element_size()
            if nbytes > limit:
                raise CheckpointError(f"refused to load {path}: a tensor of shape {tuple(x.shape)} stands for "
                                      f"{_fmt(nbytes)}, over the limit of {_fmt(limit)} ({why})")
            continue
        if not isinstance(x, (dict, list, tuple, set, frozenset, argparse.Namespace)):
            continue
        key = id(x)
        if done:
            on_path.discard(key)
            expanded[key] = min(MAX_EXPANDED + 1, 1 + sum(expanded.get(id(c), 1) for c in children(x)))
            if expanded[key] > MAX_EXPANDED:
                raise CheckpointError(
                    f"refused to load {path}: its shared sub-structures expand to over {MAX_EXPANDED:,} objects "
                    f"(code that copies them, such as Optimizer.load_state_dict, would never finish)")
            continue
        if key in on_path:
            raise CheckpointError(f"refused to load {path}: it contains a container that contains itself")
        if key in expanded:
            continue
        if depth > MAX_DEPTH:
            raise CheckpointError(f"refused to load {path}: containers nested deeper than {MAX_DEPTH} levels")
        if isinstance(x, argparse.Namespace):
            odd = [k for k in vars(x) if not isinstance(k, str) or not k.isidentifier()]
            if odd:
                raise CheckpointError(f"refused to load {path}: its argparse.Namespace has attribute names "
                                      f"that are not identifiers ({odd[:3]!r})")
        keep.append(x)
        on_path.add(key)
        stack.append((x, depth, True))
        for c in children(x):
            stack.append((c, depth + 1, False))


# --------------------------------------------------------------------------- optimizer state

_SCALARS = (bool, int, float, str, type(None))


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Refuse optimizer state whose layout is not the optimizer's own, before ``load_state_dict``:
    the same number of groups and of parameters per group, per-parameter state of tensors shaped like
    the parameter (or scalars), group options of plain values."""
    def refuse(reason: str) -> None:
        raise CheckpointError(f"refused to load the optimizer state of {path}: {reason}")

    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        refuse("not an optimizer state dict ({'state': {...}, 'param_groups': [...]})")
    groups, own = state["param_groups"], optimizer.param_groups
    if len(groups) != len(own):
        refuse(f"it has {len(groups)} parameter groups, this run's optimizer {len(own)} (a different model or "
               f"different --weight_decay / --layer_decay grouping)")
    params: dict[int, torch.Tensor] = {}
    for i, (g, o) in enumerate(zip(groups, own)):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            refuse(f"parameter group {i} is not a dict with a 'params' list")
        ids = g["params"]
        if len(ids) != len(o["params"]) or not all(type(k) is int for k in ids):
            refuse(f"parameter group {i} has {len(ids)} parameters, this run's {len(o['params'])}")
        for k, p in zip(ids, o["params"]):
            if k in params:
                refuse(f"parameter id {k} appears twice")
            params[k] = p
        for name, v in g.items():
            if name == "params":
                continue
            ok = isinstance(v, _SCALARS) or (isinstance(v, (list, tuple)) and len(v) <= max(16, len(ids))
                                            and all(isinstance(x, _SCALARS) for x in v))
            if not isinstance(name, str) or not ok:
                refuse(f"option {name!r} of parameter group {i} is not a plain value or short list of them")
    for k, s in state["state"].items():
        if k not in params:
            refuse(f"it has state for parameter {k!r}, which no parameter group lists")
        if not isinstance(s, dict):
            refuse(f"the state of parameter {k} is not a dict")
        shape = tuple(params[k].shape)
        for name, v in s.items():
            if isinstance(v, torch.Tensor):
                if v.dim() > 0 and tuple(v.shape) != shape:
                    refuse(f"state {name!r} of parameter {k} has shape {tuple(v.shape)}, the parameter {shape}")
            elif not isinstance(v, _SCALARS) or not isinstance(name, str):
                refuse(f"state {name!r} of parameter {k} is neither a tensor nor a plain value")
