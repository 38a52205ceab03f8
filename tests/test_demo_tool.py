"""`make demo`'s script runs end to end (train -> eval -> drawn predictions) on the built-in data."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_script_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "tools/demo.py", "--epochs", "3", "--iters-per-epoch", "2",
                          "--work-dir", str(tmp_path / "demo")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "mAP" in out.stdout and "AP50" in out.stdout
    pngs = list((tmp_path / "demo" / "predictions").glob("*.png"))
    assert len(pngs) == 4
