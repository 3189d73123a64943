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


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """train/ and val/ of three colour classes (tiny_data.make_labelled)."""
    from tiny_data import make_labelled
    return make_labelled(tmp_path_factory.mktemp("labelled"))


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny configurations gain nothing from a second, and on a shared, busy
    machine it slows small ops down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
