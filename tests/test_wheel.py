"""A wheel built from the repo, installed in a fresh venv, runs the console script from an empty folder with the
packaged configs, and loads the shipped circuits (nothing read from the source checkout)."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_wheel_runs_from_an_empty_folder(tmp_path):
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    run = lambda *a, **kw: subprocess.run(a, capture_output=True, text=True, timeout=600, **kw)  # noqa: E731
    out = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next(dist.glob("etk-*.whl"))
    # A plain venv: `--system-site-packages` would give it the BASE interpreter's site-packages, not those of a
    # virtualenv running these tests (`make test PY=.venv/bin/python`), and its console script could not import hydra.
    out = run(sys.executable, "-m", "venv", str(venv))
    assert out.returncode == 0, out.stderr
    py = venv / "bin" / "python"
    out = run(str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel))
    assert out.returncode == 0, out.stderr[-3000:]
    # torch & co. from whichever environment runs the tests: its site-packages, listed in a .pth file of the new venv
    # (written after the install, so pip saw the venv alone). site.py puts the venv's own site-packages on sys.path
    # first and appends the directories a .pth names after it, so the installed wheel's `etk` is found before
    # anything there. Plain paths are not site dirs: their own .pth files (the checkout's editable-install finder
    # among them) are not processed, so nothing of the checkout reaches the venv.
    parent = [d for d in site.getsitepackages() if os.path.isdir(d)]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        parent.append(site.getusersitepackages())
    out = run(str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    assert out.returncode == 0, out.stderr
    own = out.stdout.strip()
    (Path(own) / "_etk_test_parent_site.pth").write_text("".join(f"{d}\n" for d in parent if d != own))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    out = run(str(venv / "bin" / "etk-patching"), "method=eval", "model=tiny", "logger=none", "data.n_examples=7",
              "trainer.enable_progress_bar=false", "hydra.run.dir=run", cwd=empty, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((empty / "run" / "results.json").read_text())
    assert doc["schema"] == "etk.eval/v1" and doc["n"] == 7
    code = ("import etk, json; from etk.circuits import load_circuit; c = load_circuit('llama_7b'); "
            "print(json.dumps({'file': etk.__file__, 'sizes': c.sizes()}))")
    out = run(str(py), "-c", code, cwd=empty, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert str(venv) in got["file"]  # the installed wheel, not the checkout
    assert got["sizes"] == {"value_fetcher": 40, "pos_transmitter": 7, "pos_detector": 20, "struct_reader": 5}
