"""Memory and time of hostile and sloppy inputs: crafted checkpoints, a 16-bit image, a large JPEG,
tar shards (an index claiming 10^10 samples, a brace range of 10^9 names, a 1 GiB member).

    python tools/hostile_inputs.py                      # this tree
    python tools/hostile_inputs.py --code /tmp/before   # another checkout (e.g. `git archive` of main)
    python tools/hostile_inputs.py --shards_only        # only the shard rows (kept beside the others)

Each case runs in its own process (peak RSS = ru_maxrss after minus before the load), with a
time limit; prints a table and writes benchmarks/hostile_inputs_<label>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASE = textwrap.dedent("""
    import argparse, json, resource, sys, time
    sys.path[:0] = [{code!r}, {tests!r}]
    import torch
    from pathlib import Path
    case, d = {case!r}, Path({tmp!r})
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    path = Path({path!r})
    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from util.checkpoint import safe_load
    base, t = rss(), time.perf_counter()
    try:
        if case.startswith("optimizer"):
            from util.train_state import resume_training_state
            args = argparse.Namespace(resume=str(path), auto_resume=False, start_epoch=0, output_dir=str(d))
            resume_training_state(args, model, opt, None, log=lambda *a, **k: None)
        else:
            safe_load(path)
        outcome = "loaded"
    except Exception as e:
        outcome = f"{{type(e).__name__}}: {{str(e).splitlines()[0] if str(e) else ''}}"
    print(json.dumps(dict(case=case, size=path.stat().st_size, seconds=round(time.perf_counter() - t, 3),
                          rss_mb=round((rss() - base) / 2 ** 20, 1), outcome=outcome[:300])))
""")

IMAGE = textwrap.dedent("""
    import json, resource, sys, time, warnings
    sys.path[:0] = [{code!r}]
    import numpy as np
    from PIL import Image
    from pathlib import Path
    from util.datasets import ImageList, pretrain_transform
    d = Path({tmp!r})
    ramp = np.asarray(Image.open(d / "ramp16.png")).astype(np.int64)
    img = np.asarray(ImageList([(str(d / "ramp16.png"), 0)]).load(0)[0])
    white = float((img == 255).all(-1).mean())
    err = float(np.abs(img[..., 0] - np.rint(ramp * 255.0 / 65535)).max())
    print(json.dumps(dict(case="16-bit grey ramp", white_fraction=round(white, 4), max_abs_error=err)))
    base, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter()
    images = ImageList([(str(d / "big.jpg"), 0)])
    tf = pretrain_transform(224)
    if hasattr(images, "min_side"):
        from util.datasets import needed_side
        images.min_side = needed_side(224, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            x = tf(images.load(0)[0])
    dt = (time.perf_counter() - t) / 3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps(dict(case="8000x6000 JPEG, pretraining crop", seconds=round(dt, 3),
                          rss_mb=round(rss / 2 ** 20, 1))))
""")

SHARD = textwrap.dedent("""
    import json, resource, sys, time, warnings
    sys.path[:0] = [{code!r}]
    from util.datasets import image_list, pretrain_transform
    from util.shards import ShardStream
    case, spec = {case!r}, {spec!r}
    base, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images = image_list(spec, "train", labelled=False)
            batch = next(iter(ShardStream(images, pretrain_transform(32), 2, 0, train=False)))
        skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
        outcome = "read; " + (skipped[0] if skipped else "nothing skipped")
    except BaseException as e:
        outcome = f"{{type(e).__name__}}: {{str(e).splitlines()[0] if str(e) else ''}}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps(dict(case=case, seconds=round(time.perf_counter() - t, 3), rss_mb=round(rss / 2 ** 20, 1),
                          outcome=outcome[:300])))
""")


def make_shards(d: Path) -> dict[str, str]:
    """Shard folders of 3 shards x 5 small PNGs with an index, each spoilt one way; case -> --data_path."""
    import io
    import shutil
    import tarfile

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    png = buf.getvalue()

    def write(folder: Path, big_member: bool = False) -> None:
        folder.mkdir()
        shardlist = []
        for k in range(3):
            path = folder / f"train-{k:06d}.tar"
            with tarfile.open(path, "w") as tar:
                for i in range(5):
                    info = tarfile.TarInfo(f"{k}{i:04d}.png")
                    info.size = len(png)
                    tar.addfile(info, io.BytesIO(png))
            shardlist.append({"url": path.name, "nsamples": 5, "filesize": path.stat().st_size})
        if big_member:  # a 1 GiB member (a sparse file: really present, no disk used) ahead of the others
            path = folder / "train-000000.tar"
            with open(path, "wb") as f:
                info = tarfile.TarInfo("h0000.png")
                info.size = 1 << 30
                f.write(info.tobuf())
                f.seek(512 + (1 << 30))
                f.write((folder / "train-000001.tar").read_bytes())  # 5 more samples, then the end marker
            shardlist[0] = {"url": path.name, "nsamples": 6, "filesize": path.stat().st_size}
        (folder / "train.json").write_text(json.dumps({"shardlist": shardlist, "classes": []}))

    write(d / "huge_count")
    index = json.loads((d / "huge_count" / "train.json").read_text())
    index["shardlist"][1]["nsamples"] = 10 ** 10
    (d / "huge_count" / "train.json").write_text(json.dumps(index))
    write(d / "big_member", big_member=True)
    shutil.copytree(d / "huge_count", d / "typo", ignore=shutil.ignore_patterns("*.json"))
    return {"shard index claims 10^10 samples": str(d / "huge_count"),
            "brace range of 10^9 shard names": str(d / "typo" / "train-{000000..999999999}.tar"),
            "1 GiB tar member": str(d / "big_member")}


def make_files(d: Path) -> dict[str, Path]:
    """The crafted files, written once (the deflate one takes a few seconds to compress)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import hostile_files as H
    import torch
    model = torch.nn.Linear(8, 4)  # the same model as in CASE
    opt = torch.optim.AdamW(model.parameters())
    return {
        "bytearray(1 GiB)": H.bytearray_bomb(d / "ba.pth", 1 << 30),
        "torch.FloatTensor(2**28)": H.tensor_class_bomb(d / "ft.pth", 1 << 28),
        "deflate 1 GiB": H.deflate_bomb(d / "deflate.pth", 1 << 30),
        "raw protocol-4 pickle": H.raw_pickle(d / "raw.pkl"),
        "Namespace with list state": H.odd_namespace(d / "ns.pth"),
        "optimizer shared lists (2**60)": H.optimizer_expansion(d / "exp.pth", model, opt),
    }


def make_images(d: Path) -> None:
    """A 16-bit grey ramp and an 8000x6000 JPEG, written here so the measuring process only reads them."""
    import numpy as np
    from PIL import Image
    Image.fromarray(np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))).save(d / "ramp16.png")
    Image.new("RGB", (8000, 6000), (90, 120, 200)).save(d / "big.jpg", quality=85)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", default=str(ROOT), help="repository tree whose util/ is measured")
    p.add_argument("--label", default=None, help="name of the JSON file (default: 'after' for this tree)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as not finishing")
    p.add_argument("--images_only", action="store_true", help="measure only the image rows")
    p.add_argument("--shards_only", action="store_true", help="measure only the shard rows")
    args = p.parse_args()
    import tempfile
    label = args.label or ("after" if Path(args.code).resolve() == ROOT else "before")
    rows = []
    def measure(case: str, script: str) -> dict:
        """One case in its own process: its JSON line, or why there is none."""
        try:
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(case=case, seconds=f">{args.timeout:g}", outcome="did not finish")
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else \
            dict(case=case, outcome=f"crashed: {out.stderr.strip().splitlines()[-1][:200]}")

    with tempfile.TemporaryDirectory() as tmp:
        for case, spec in (make_shards(Path(tmp)) if not args.images_only else {}).items():
            rows.append(measure(case, SHARD.format(code=args.code, case=case, spec=spec)))
        only = args.images_only or args.shards_only
        for case, path in (make_files(Path(tmp)) if not only else {}).items():
            rows.append(measure(case, CASE.format(code=args.code, tests=str(ROOT / "tests"), case=case, tmp=tmp,
                                                  path=str(path))))
        if not args.shards_only:
            make_images(Path(tmp))
            out = subprocess.run([sys.executable, "-c", IMAGE.format(code=args.code, tmp=tmp)],
                                 capture_output=True, text=True, timeout=300)
            rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))
    dest = ROOT / "benchmarks" / f"hostile_inputs_{label}.json"
    code = args.code
    if (args.images_only or args.shards_only) and dest.exists():  # keep the other rows of an earlier run
        earlier = json.loads(dest.read_text())
        mine = {r["case"] for r in rows}
        code, rows = earlier["code"], [r for r in earlier["rows"] if r["case"] not in mine] + \
            [{**r, "code": args.code} for r in rows]
    dest.write_text(json.dumps(dict(code=code, rows=rows), indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
