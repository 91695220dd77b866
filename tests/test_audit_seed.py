"""Audit sampling is reproducible: the same frames are audited in every process."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

SCRIPT = r"""
import sys
import numpy as np
from edgeva.config import load_config
from edgeva.daemon import Daemon
from edgeva.query import FrameView
from edgeva.messages import Frame
from edgeva.systemd import Notifier

cfg = load_config(sys.argv[1])
daemon = Daemon(cfg, notifier=Notifier({}))
daemon.models.sync(cfg)
query = daemon._build_query(cfg.queries[0])
filt = query.filter
image = np.full((48, 64, 3), 100, np.uint8)
prepared = FrameView(Frame("cam", 0, 0.0, 0.0, image)).prepared(filt.differencer)
filt.mark_inferred(prepared)
print("".join("A" if filt.decide(prepared).audit else "." for _ in range(300)))
daemon.models.stop()
"""


def test_the_same_frames_are_audited_whatever_the_hash_seed(tmp_path, small_clip):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "cameras": [{"id": "cam", "source": str(small_clip)}],
        "queries": [{"id": "scene-cam", "camera": "cam", "model": "mobilenet_v3_small", "task": {"type": "classify"},
                     "filter": {"threshold": 1.0, "max_skip": 100000, "audit_fraction": 0.3}}],
        "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
    runs = []
    for hash_seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(cfg)], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONHASHSEED=hash_seed))
        assert out.returncode == 0, out.stderr
        runs.append(out.stdout.strip())
    assert 40 < runs[0].count("A") < 140           # about 30 % of 300
    assert runs[0] == runs[1] == runs[2]
