"""The demo model builds from the PyPI package with no network, once, even when processes race."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import requires_demo


@requires_demo
def test_two_processes_racing_build_one_folder(tmp_path):
    env = {**os.environ, "EDITGUARD_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "editguard", "-q", "fetch", "demo:smollm2-135m"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = {out.strip() for out, _ in outs}
    assert len(folders) == 1
    models = tmp_path / "home" / "models"
    built = sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock"))
    assert built == ["demo-smollm2-135m"], built  # no temp folders left behind
    assert (models / "demo-smollm2-135m" / "model.safetensors").stat().st_size > 500_000_000
