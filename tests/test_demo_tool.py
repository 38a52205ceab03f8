"""`make demo`'s script runs end to end (train -> eval -> drawn predictions -> routing maps -> HTML report) on the
built-in data, ends with a screen whose every output path exists, and its "next" eval command runs as printed."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_script_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    work = tmp_path / "demo"
    # --full with 3 epochs: the config file says 24 epochs (phase 'route' at epoch 3), the run trained 3 (epoch 3
    # is 'finetune'); the later steps read the run's config.json, so no phase-mismatch warning may appear
    out = subprocess.run([sys.executable, "tools/demo.py", "--full", "--epochs", "3", "--iters-per-epoch", "2",
                          "--images", "2", "--report-samples", "4", "--work-dir", str(work), "--cfg-options",
                          "runtime.kmeans_init_batches=1", "runtime.eval_interval=0", "data.num_workers=0",
                          "runtime.num_threads=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "saved in phase" not in log and "WARNING" not in log, log[-3000:]
    for k in range(1, 6):
        assert f"[{k}/5] done in" in out.stdout
    screen = out.stdout[out.stdout.index("PCE demo done in"):].splitlines()
    assert len(screen) <= 24
    metrics = json.loads((work / "metrics_val.json").read_text())
    assert f"val AP50 {metrics['AP50']:.3f}" in screen[1] and metrics["num_images"] == 100
    outputs = screen[screen.index("outputs:") + 1:next(i for i, l in enumerate(screen) if l.startswith("next"))]
    paths = [Path(l[22:].split()[0]) for l in outputs]
    assert {p.name for p in paths} == {"best.pth", "config.json", "metrics_val.json", "predictions", "routing_maps",
                                       "report.html", "train.log", "metrics.jsonl"}
    assert all(p.exists() for p in paths), [p for p in paths if not p.exists()]
    assert len(list((work / "predictions").glob("*.png"))) == 2
    assert len(json.loads((work / "routing_maps" / "routing_maps.json").read_text())) == 2
    assert "<html" in (work / "report.html").read_text()[:500].lower()
    # the first "next" command is the real one: it evaluates the run again, to the same numbers
    nxt = screen[screen.index(next(l for l in screen if l.startswith("next"))) + 1].split()
    assert nxt[1:3] == ["tools/eval.py", str(work / "config.json")]
    again = subprocess.run([sys.executable] + nxt[1:], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"AP50: {metrics['AP50']:.4f}" in again.stdout and "saved in phase" not in again.stderr, shlex.join(nxt)
