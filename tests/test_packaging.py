"""``pip install .`` gives the model layer as ``ummae_models``, importable next to another project's ``models``.

A fresh virtual environment (no pip of its own, no PYTHONPATH) reuses this environment's torch
through a ``.pth`` line; pip installs the package from a copy of pyproject.toml + models/ without
build isolation (setuptools from this environment) and without the registry, so the test runs
offline. In that venv, from a folder holding an unrelated ``models`` package, the FINETUNE.md
example ("Using the weights elsewhere") runs on an exported backbone and gives the features this
checkout gives. One test, about 20-40 s: it installs twice (``pip install .`` and ``-e .``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from tools.export import export

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, importlib.metadata as md
import torch
import models, ummae_models                                  # the unrelated package and ours, side by side
from pathlib import Path
assert models.NAME == "unrelated", models.__file__
top = sorted({str(f).split("/")[0] for f in md.files("ummae-models")})
back = ummae_models.load_exported(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    feats = back.forward_pyramid(x)
torch.save(feats, sys.argv[3])
print(json.dumps({"top_level": top, "module": ummae_models.__file__,
                  "loaded": sorted(k for k in sys.modules if k.split(".")[0] in ("util", "tools", "engine", "errors"))}))
"""


def _venv(path: Path) -> Path:
    """A venv without pip whose site-packages also sees this environment's (torch, timm, setuptools)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_reuse_project_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return py


def _pip_install(py: Path, source: Path, editable: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-build-isolation",
           "--no-index", "--disable-pip-version-check", "-q"] + (["-e"] if editable else []) + [str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=source)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="setuptools is not installed in this environment: building the package offline needs "
                           "it (pip install setuptools, or build with isolation where the registry is reachable)")
def test_pip_install_gives_ummae_models_next_to_another_models_package(tmp_path):
    # the source, as a user's checkout holds it (a copy: the build writes build/ and *.egg-info beside it)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "models", src / "models", ignore=shutil.ignore_patterns("__pycache__"))

    # an exported backbone and the features this checkout computes
    torch.manual_seed(0)
    net = models.create_model("swin_pico_128", num_classes=0).eval()
    ckpt = tmp_path / "pretrained.pth"
    torch.save({"model": net.state_dict()}, ckpt)
    work = tmp_path / "elsewhere"
    (work / "models").mkdir(parents=True)
    (work / "models" / "__init__.py").write_text("NAME = 'unrelated'\n")
    folder = export(str(ckpt), "swin_pico_128", str(work / "exported" / "swin_tiny_ummae"))
    x = torch.randn(2, 3, 128, 128)
    torch.save(x, work / "x.pt")
    (work / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    py = _venv(tmp_path / "venv")
    _pip_install(py, src, editable=False)
    done = subprocess.run([str(py), "probe.py", str(folder), "x.pt", "feats.pt"], cwd=work, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["top_level"] == ["ummae_models", "ummae_models-0.1.0.dist-info"]  # no models / util / tools
    assert "site-packages" in out["module"] and out["loaded"] == []             # nothing of the checkout
    with torch.no_grad():
        for a, b in zip(net.forward_pyramid(x), torch.load(work / "feats.pt", weights_only=True)):
            assert torch.equal(a, b)

    # the FINETUNE.md example, as written, from the unrelated folder (its folder name is the one above)
    text = (ROOT / "FINETUNE.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "import ummae_models" in b)
    (work / "example.py").write_text(snippet)
    done = subprocess.run([str(py), "example.py"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\(2, 150, \d+, \d+\)", done.stdout), done.stdout

    # pip install -e . maps the same name onto the source folder
    py = _venv(tmp_path / "venv_editable")
    _pip_install(py, src, editable=True)
    done = subprocess.run([str(py), "-c", "import models, ummae_models; print(models.NAME, ummae_models.__file__)"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["unrelated", str(src / "models" / "__init__.py")]
