"""How often a good two-rank gloo run fails at exit, per way of ending the process group.

    python tools/teardown_stress.py                              # 100 runs of each teardown, 3 at once
    python tools/teardown_stress.py --runs 200 --teardown cleanup --jobs 4
    python tools/teardown_stress.py --runs 200 --workload steploop --teardown destroy cleanup

Each run is two processes (ranks 0 and 1, a file store) doing what a training program does with the
process group: build it, build an optimizer (which imports torch._dynamo and with it
torch.distributed.nn.functional), all-reduce (``--workload allreduce``) or run three steps of the
training loop as the suite's gloo probe does (``--workload steploop``), then end the group one of
these ways:

  none         the group is never destroyed: it lives into interpreter finalization, which is what a
               leftover reference to it amounts to (the positive control);
  destroy      barrier, then ``dist.destroy_process_group()`` (what the tests and programs did);
  no-import    the same, with torch.distributed.nn.functional imported *before* the group is built
               (its default arguments then hold None instead of the group);
  cleanup      ``engine.distributed.cleanup()``, the one shutdown path of the programs and tests.

A run fails when either rank exits non-zero (SIGABRT: 'terminate called without an active exception').
Runs go side by side (``--jobs`` pairs at once) to load the machine. Prints a table and writes
benchmarks/teardown_stress.json (or ``--out``). Not part of the test suite: it takes minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEARDOWNS = ("none", "destroy", "no-import", "cleanup")
WORKLOADS = ("allreduce", "steploop")

RANK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    rank, store, teardown, workload = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import torch
    if teardown == "no-import":
        import torch.distributed.nn.functional  # bound before the group exists: its defaults stay None
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)   # imports torch._dynamo, torch.distributed.nn.functional
    if workload == "steploop":   # the suite's gloo probe: three steps of the training loop, counts all-reduced
        from engine.step import StepLoop, StepOutput, StepSettings
        loop = StepLoop(model, opt, None, torch.device("cpu"), StepSettings(print_every=100))
        stats = loop.run([torch.ones(1, 4)] * 3, 0, 0, 3,
                         lambda b: StepOutput(model(b).sum(), 1, {{"skipped_images": 2 * rank}}),
                         lambda step: 0.0, periods=1)
        assert stats["skipped_images"] == 6, stats
    else:                        # a bare all-reduce
        t = torch.full((8,), float(rank))
        dist.all_reduce(t)
        assert t[0].item() == 1.0
    if teardown == "cleanup":
        from engine.distributed import cleanup
        cleanup()
    elif teardown == "none":     # the group lives into interpreter finalization, as a leaked reference makes it
        pass
    else:
        dist.barrier()
        dist.destroy_process_group()
""")


def one_run(teardown: str, workload: str, timeout: float) -> dict:
    """Both ranks of one run; their exit statuses and, for a failure, the end of their stderr."""
    script = RANK.format(root=str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(Path(d) / "store"), teardown, workload],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
                 for r in range(2)]
        deadline = time.monotonic() + timeout   # one limit for the run: rank 1 waits no longer than rank 0
        codes, errs = [], []
        for p in procs:
            try:
                errs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[1])
                codes.append(p.returncode)
            except subprocess.TimeoutExpired:   # a loaded machine (importing torch._dynamo takes minutes) or a hang
                p.kill()
                errs.append(p.communicate()[1])
                codes.append("timeout")
    failed = any(c != 0 for c in codes)
    return {"codes": codes, "stderr": [e[-400:] for e in errs] if failed else None,
            "timed_out": "timeout" in codes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100, help="runs (rank pairs) per teardown")
    p.add_argument("--jobs", type=int, default=3, help="runs at once")
    p.add_argument("--teardown", choices=TEARDOWNS, nargs="+", default=["destroy", "no-import", "cleanup"])
    p.add_argument("--workload", choices=WORKLOADS, default="allreduce",
                   help="what the ranks do before the teardown: a bare all-reduce, or three steps of the training "
                        "loop (engine.step.StepLoop, the suite's gloo probe in tests/test_hostile_input.py)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take (timeouts are counted apart)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "teardown_stress.json")
    args = p.parse_args()
    import torch
    rows = []
    for teardown in args.teardown:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda _: one_run(teardown, args.workload, args.timeout), range(args.runs)))
        bad = [r for r in results if r["stderr"] is not None and not r["timed_out"]]
        codes = sorted({c for r in bad for c in r["codes"] if c != 0}, key=str)
        timed_out = sum(r["timed_out"] for r in results)
        rows.append({"teardown": teardown, "workload": args.workload, "runs": args.runs, "failed": len(bad), "timed_out": timed_out,
                     "exit_codes": codes,
                     "seconds": round(time.perf_counter() - t0, 1), "examples": bad[:3]})
        r = rows[-1]
        print(f"{teardown:10s} {r['runs']:5d} runs  {r['failed']:4d} failed  codes {codes}  "
              f"{timed_out} timed out  {r['seconds']:.0f} s",
              flush=True)
    print("\n| workload | teardown | runs | failed | rate | exit codes | timed out |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['teardown']} | {r['runs']} | {r['failed']} | {100 * r['failed'] / r['runs']:.1f}% | "
              f"{', '.join(map(str, r['exit_codes'])) or '-'} | {r['timed_out']} |")
    meta = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "jobs": args.jobs,
            "load_avg_at_end": os.getloadavg()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(r["failed"] or r["timed_out"] for r in rows if r["teardown"] == "cleanup") else 0


if __name__ == "__main__":
    sys.exit(main())
