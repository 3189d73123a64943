import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _reference_dir() -> Path | None:
    env = os.environ.get("UMMAE_REFERENCE_DIR")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "reference", ROOT / "shared" / "reference"]:
        if (cand / "golden").is_dir():
            return cand
    return None


REFERENCE = _reference_dir()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if REFERENCE is None:
        pytest.skip("reference fixtures not found (set UMMAE_REFERENCE_DIR or place shared/ beside the repo)")
    return REFERENCE


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
