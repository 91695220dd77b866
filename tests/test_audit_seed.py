"""Audit sampling is reproducible (the same frames are audited in every process) and shared by a
camera's queries (they audit the same frames, so the model runs each such frame once)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

SCRIPT = r"""
from edgeva.filtering import audit_draw
print("".join("A" if audit_draw("cam", seq) < 0.3 else "." for seq in range(300)))
"""


def test_the_same_frames_are_audited_whatever_the_hash_seed():
    runs = []
    for hash_seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONHASHSEED=hash_seed))
        assert out.returncode == 0, out.stderr
        runs.append(out.stdout.strip())
    assert 60 < runs[0].count("A") < 120           # about 30 % of 300
    assert runs[0] == runs[1] == runs[2]


def test_the_queries_of_a_camera_audit_the_same_frames():
    """Two queries of one camera that skip every frame, auditing 30 % and 10 % of them: the 10 %
    are among the 30 %, so the model runs 30 % of the frames for both, not 40 %."""
    from edgeva.config import parse_config
    from edgeva.filtering import QueryFilter
    from edgeva.messages import Frame
    from edgeva.models.tasks import build_task
    from edgeva.query import FrameView, ModelQuery
    from edgeva.results import ResultHub
    from edgeva.stats import StatsRegistry
    from tests.blob_model import BlobDetector

    image = np.zeros((48, 64, 3), np.uint8)
    blob = BlobDetector(image)
    audited: dict[str, set[int]] = {"often": set(), "rarely": set()}

    class _Port:
        key, model = "blob", blob

        def submit(self, item, wait_s=0.0):
            if item.audit:
                audited[item.owner.query_id].add(item.frame.seq)
            item.owner.complete(item, blob.predict([item.frame.image])[0], time.monotonic())
            return True

    cfg = parse_config({"cameras": [{"id": "street", "source": "rtsp://x/y"}],
                        "queries": [{"id": q, "camera": "street", "model": "yolov8n",
                                     "task": {"type": "count", "classes": ["car"]},
                                     "filter": {"threshold": 1.0, "max_skip": 100000, "feature": "pixel",
                                                "audit_fraction": share}}
                                    for q, share in (("often", 0.3), ("rarely", 0.1))]})
    stats, hub = StatsRegistry(), ResultHub()
    queries = []
    for q in cfg.queries:
        task = build_task(q.task, blob, q.id)
        filt = QueryFilter(q.filter, agreement=task.agreement, target=0.9, fps=10.0)
        queries.append(ModelQuery(q, stats, hub, _Port(), task, filt))
    for seq in range(400):
        view = FrameView(Frame("street", seq, time.time(), time.monotonic(), image), fps=10.0)
        for query in queries:           # as the camera's dispatcher hands them one view
            query.submit(view)
    often, rarely = audited["often"], audited["rarely"]
    assert 80 < len(often) < 160 and 15 < len(rarely) < 70
    assert rarely <= often
