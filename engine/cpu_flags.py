"""The flags that opt in to the CPU optimisation of engine/cpu_perf.py, without importing torch (every
program's parser takes them, and --help answers before torch loads)."""
from __future__ import annotations


def add_cpu_tuning_args(p) -> None:
    """The flags that opt in (shared by the programs and the benchmark)."""
    p.add_argument("--cpu_tuning", action="store_true",
                   help="CPU runs: turn on the optional CPU optimisation of engine/cpu_perf.py (fp32 linear layers "
                        "on oneDNN and a malloc that keeps freed memory); off by default, ignored on CUDA")
    p.add_argument("--cpu_matmul", default=None, choices=["onednn", "aten"],
                   help="CPU runs: fp32 linear layers on oneDNN or on aten's BLAS (MKL/OpenBLAS); default: onednn "
                        "with --cpu_tuning, else aten")
