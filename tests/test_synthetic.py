"""The synthetic street: determinism, truth that matches the pixels, and clips that decode."""
from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from edgeva.synthetic import (
    CLASSES, PRESETS, FrameTruth, Phase, SceneSpec, counts_per_frame, ensure_clip, load_truth,
    render_background, render_scene, truth_path_for, write_clip,
)

SMALL = PRESETS["small"]
# Empty for 2 s, traffic for 4 s, then 18 s with no arrivals: the street drains (by ~16.4 s here).
DRAINING = SceneSpec(width=320, height=180, fps=10.0, seconds=24.0, seed=24,
                     phases=(Phase(2, 0, 0), Phase(4, 2.0, 1.0), Phase(18, 0, 0)))
CLEAN = dataclasses.replace(DRAINING, noise_sigma=0.0, lighting_drift=0.0)
# Cars only, one short burst between empty stretches.
CARS_ONLY = SceneSpec(width=320, height=180, fps=10.0, seconds=10.0, seed=2, bus_share=0.0, bicycle_share=0.0,
                      phases=(Phase(3, 0, 0), Phase(1, 1.5, 0), Phase(6, 0, 0)))


def render(spec: SceneSpec) -> tuple[list[np.ndarray], list[FrameTruth]]:
    frames, truths = [], []
    for image, truth in render_scene(spec):
        frames.append(image)
        truths.append(truth)
    return frames, truths


@pytest.fixture(scope="module")
def small() -> tuple[list[np.ndarray], list[FrameTruth]]:
    return render(SMALL)


@pytest.fixture(scope="module")
def draining() -> tuple[list[np.ndarray], list[FrameTruth]]:
    return render(DRAINING)


@pytest.fixture(scope="module")
def clean() -> tuple[list[np.ndarray], list[FrameTruth]]:
    return render(CLEAN)


def test_same_spec_renders_byte_identical_frames(small):
    frames, truths = small
    again_frames, again_truths = render(SMALL)
    assert len(frames) == SMALL.n_frames == 100
    assert all(np.array_equal(a, b) for a, b in zip(frames, again_frames))
    assert truths == again_truths


def test_different_seeds_differ(small):
    other_frames, other_truths = render(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert not np.array_equal(small[0][0], other_frames[0])
    assert [t.objects for t in small[1]] != [t.objects for t in other_truths]


def test_frames_have_the_spec_shape_and_type(small):
    image = small[0][0]
    assert image.shape == (180, 320, 3) and image.dtype == np.uint8


def test_boxes_and_counts_are_consistent(draining):
    _, truths = draining
    seen_classes = set()
    for ft in truths:
        for obj in ft.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= DRAINING.width and 0 <= y0 < y1 <= DRAINING.height
            assert obj.cls in CLASSES
            seen_classes.add(obj.cls)
        ids = [o.track_id for o in ft.objects]
        assert len(ids) == len(set(ids))
        counts = ft.counts()
        assert sum(counts.values()) == len(ft.objects)
        assert counts["person"] == sum(o.cls == "person" for o in ft.objects)
        strict = ft.counts(fully_visible_only=True)
        assert sum(strict.values()) == sum(o.fully_visible for o in ft.objects)
    assert {"car", "person"} <= seen_classes
    assert counts_per_frame(truths) == [ft.counts() for ft in truths]


def test_fully_visible_objects_are_not_at_the_frame_edge_unless_they_fit(draining):
    _, truths = draining
    partial = [o for ft in truths for o in ft.objects if not o.fully_visible]
    assert partial, "objects entering and leaving the frame should be reported as partial"
    for o in partial:
        x0, y0, x1, y1 = o.box
        assert x0 == 0 or y0 == 0 or x1 == DRAINING.width or y1 == DRAINING.height


def test_quiet_phases_are_empty(draining):
    _, truths = draining
    assert all(not ft.objects for ft in truths if ft.t < 2.0)      # nothing has arrived yet
    assert any(ft.objects for ft in truths if ft.phase == 1)
    assert all(not ft.objects for ft in truths[-50:])               # drained by the end
    assert all(ft.phase == 2 for ft in truths[-50:])


def test_truth_matches_pixels(clean):
    """Without noise or drift, pixels differ from the empty street inside the boxes only."""
    frames, truths = clean
    background = render_background(CLEAN).astype(np.int16)
    checked = 0
    for image, ft in zip(frames, truths):
        diff = np.abs(image.astype(np.int16) - background).max(axis=2)
        covered = np.zeros(diff.shape, bool)
        for obj in ft.objects:
            x0, y0, x1, y1 = obj.box
            covered[y0:y1, x0:x1] = True
            if obj.fully_visible:
                region = diff[y0:y1, x0:x1]
                assert (region > 20).mean() > 0.2, (ft.index, obj)
                checked += 1
        # Anti-aliasing may tint a pixel just outside a box faintly; nothing more.
        assert diff[~covered].max(initial=0) <= 10, f"frame {ft.index}: pixels changed outside every box"
    assert checked > 50


def test_noise_and_drift_change_empty_frames_slightly_but_a_moving_car_much_more():
    frames, truths = render(CARS_ONLY)
    empty_pairs = [(a, b) for a, b, ta, tb in zip(frames, frames[1:], truths, truths[1:])
                   if not ta.objects and not tb.objects]
    assert len(empty_pairs) > 20
    empty_diffs = [cv2.absdiff(a, b).mean() for a, b in empty_pairs]
    assert min(empty_diffs) > 0.5                                   # the naive filter sees "change"

    # Only where a single car moves: compare per-pixel change within its box.
    car_diffs = []
    for a, b, ta, tb in zip(frames, frames[1:], truths, truths[1:]):
        if len(tb.objects) == 1 and tb.objects[0].cls == "car" and tb.objects[0].fully_visible:
            x0, y0, x1, y1 = tb.objects[0].box
            car_diffs.append(cv2.absdiff(a[y0:y1, x0:x1], b[y0:y1, x0:x1]).mean())
    assert car_diffs
    assert np.median(car_diffs) > 4 * max(empty_diffs)
    assert max(empty_diffs) < 4.0


def test_written_clip_decodes_close_to_the_rendered_frames(tmp_path, small):
    frames, truths = small
    video = write_clip(SMALL, tmp_path / "small_street.mp4")
    assert video.exists() and video.suffix in (".mp4", ".avi")
    assert truth_path_for(video) == tmp_path / "small_street.truth.json"

    cap = cv2.VideoCapture(str(video))
    assert cap.isOpened()
    assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == SMALL.width
    assert int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == SMALL.height
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(SMALL.fps, rel=1e-3)
    decoded = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        decoded.append(image)
    cap.release()
    assert len(decoded) == SMALL.n_frames
    diffs = [cv2.absdiff(a, b).mean() for a, b in zip(decoded, frames)]
    assert max(diffs) < 8.0, max(diffs)

    clip = load_truth(video)
    assert clip.spec == SMALL and clip.spec_hash == SMALL.spec_hash() and clip.video == video
    assert clip.frames == truths
    doc = json.loads(truth_path_for(video).read_text())
    assert doc["counts"]["car"] == [ft.counts()["car"] for ft in truths]
    assert set(doc["frames"][0]) >= {"index", "t", "objects"}


def test_ensure_clip_reuses_a_matching_clip_and_rewrites_a_changed_one(tmp_path):
    spec = dataclasses.replace(SMALL, seconds=1.0)
    path, written = ensure_clip(spec, tmp_path / "c.mp4")
    assert written
    assert ensure_clip(spec, tmp_path / "c.mp4") == (path, False)
    assert ensure_clip(spec, tmp_path / "c.mp4", force=True)[1]
    changed = dataclasses.replace(spec, seed=spec.seed + 1)
    assert changed.spec_hash() != spec.spec_hash()
    assert ensure_clip(changed, tmp_path / "c.mp4")[1]
    assert load_truth(path).spec == changed


def test_spec_round_trips_and_validates():
    for spec in PRESETS.values():
        assert SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert SceneSpec(phases=[(5, 1.0, 0.5)]).phases == (Phase(5, 1.0, 0.5),)
    with pytest.raises(ValueError):
        SceneSpec(fps=0)
    with pytest.raises(ValueError):
        SceneSpec(phases=())


def test_presets():
    assert {"demo", "quiet", "busy", "small"} <= set(PRESETS)
    demo = PRESETS["demo"]
    assert (demo.width, demo.height, demo.fps, demo.seconds) == (640, 360, 15.0, 60.0)
    assert any(p.car_rate == 0 and p.person_rate == 0 for p in demo.phases)
    small = PRESETS["small"]
    assert (small.width, small.height, small.fps, small.seconds) == (320, 180, 10.0, 10.0)


def test_camera_shake_moves_the_boxes_with_the_picture():
    spec = dataclasses.replace(DRAINING, seconds=5.0, shake_px=3.0, noise_sigma=0.0, lighting_drift=0.0)
    still = dataclasses.replace(spec, shake_px=0.0)
    shaken = list(render_scene(spec))
    steady = list(render_scene(still))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(shaken, steady))
    assert any(a[1].objects != b[1].objects for a, b in zip(shaken, steady) if a[1].objects)
