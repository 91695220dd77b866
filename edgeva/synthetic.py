"""Deterministic synthetic street scenes with per-frame ground truth.

`render_scene(spec)` yields ``(BGR frame, FrameTruth)`` pairs. Everything is drawn from
numpy Generators seeded by ``spec.seed``, so the same spec gives byte-identical frames.
Sensor noise and a slow brightness drift make even empty frames differ slightly, which is
the negative control for frame-difference filters. `write_clip` stores a video plus a
``<stem>.truth.json`` sidecar; `load_truth` reads the sidecar back.

The street, top to bottom: buildings and trees, sidewalk, a four-lane road (upper two lanes
drive left, lower two right) with a zebra crosswalk, sidewalk, a strip of park. Vehicles
keep their distance and stop for pedestrians on the crosswalk, so traffic has stopped
stretches as well as moving ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import cv2
import numpy as np

RENDER_VERSION = 1  # bump whenever drawing or motion changes, so cached clips are regenerated
CLASSES: tuple[str, ...] = ("car", "person", "bus", "bicycle")
ObjectClass = Literal["car", "person", "bus", "bicycle"]

_SHIFT = 4                 # cv2 fixed-point bits: positions are drawn with 1/16 px precision
_ONE = 1 << _SHIFT
_AA_PAD = 1.0              # anti-aliased edges tint up to a pixel beyond the drawn extent


# --------------------------------------------------------------------------- spec & truth

@dataclass(frozen=True)
class Phase:
    """A stretch of the traffic schedule; rates are Poisson arrivals per second."""

    duration_s: float
    car_rate: float       # vehicles entering (cars, buses and bicycles together)
    person_rate: float    # pedestrians appearing (from the frame edges, doors or park gates)


@dataclass(frozen=True)
class SceneSpec:
    width: int = 640
    height: int = 360
    fps: float = 15.0
    seconds: float = 10.0
    seed: int = 0
    phases: tuple[Phase, ...] = (Phase(10.0, 0.6, 0.25),)  # repeats when shorter than `seconds`
    bus_share: float = 0.08          # of vehicles
    bicycle_share: float = 0.10      # of vehicles
    crossing_share: float = 0.35     # of pedestrians, who use the crosswalk
    lighting_drift: float = 0.06     # amplitude of the global gain drift (0.06 = ±6 %)
    lighting_period_s: float = 40.0
    noise_sigma: float = 2.0         # Gaussian sensor noise, grey levels, per pixel and channel
    shake_px: float = 0.0            # camera shake amplitude; 0 = tripod

    def __post_init__(self) -> None:
        phases = tuple(p if isinstance(p, Phase) else Phase(*p) for p in self.phases)
        object.__setattr__(self, "phases", phases)
        if self.width < 64 or self.height < 64:
            raise ValueError("width and height must be >= 64")
        if self.fps <= 0 or self.seconds <= 0:
            raise ValueError("fps and seconds must be > 0")
        if not phases or any(p.duration_s <= 0 or p.car_rate < 0 or p.person_rate < 0 for p in phases):
            raise ValueError("phases must be non-empty with positive durations and rates >= 0")
        if self.bus_share + self.bicycle_share > 1:
            raise ValueError("bus_share + bicycle_share must be <= 1")

    @property
    def n_frames(self) -> int:
        return max(1, round(self.seconds * self.fps))

    def phase_index_at(self, t: float) -> int:
        cycle = sum(p.duration_s for p in self.phases)
        t = t % cycle
        for i, phase in enumerate(self.phases):
            if t < phase.duration_s:
                return i
            t -= phase.duration_s
        return len(self.phases) - 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["phases"] = [[p.duration_s, p.car_rate, p.person_rate] for p in self.phases]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneSpec:
        return cls(**{**d, "phases": tuple(Phase(*p) for p in d["phases"])})

    def spec_hash(self) -> str:
        payload = json.dumps({"render_version": RENDER_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ObjectTruth:
    track_id: int
    cls: ObjectClass
    box: tuple[int, int, int, int]   # xyxy pixels, clipped to the frame
    fully_visible: bool              # the whole object is inside the frame (occlusion ignored)


@dataclass(frozen=True)
class FrameTruth:
    index: int
    t: float
    objects: tuple[ObjectTruth, ...]
    phase: int = 0                   # index into spec.phases

    def counts(self, classes: Sequence[str] = CLASSES, fully_visible_only: bool = False) -> dict[str, int]:
        counts = dict.fromkeys(classes, 0)
        for obj in self.objects:
            if obj.cls in counts and (obj.fully_visible or not fully_visible_only):
                counts[obj.cls] += 1
        return counts


def counts_per_frame(truths: Iterable[FrameTruth], classes: Sequence[str] = CLASSES,
                     fully_visible_only: bool = False) -> list[dict[str, int]]:
    return [ft.counts(classes, fully_visible_only) for ft in truths]


PRESETS: dict[str, SceneSpec] = {
    # Mixed traffic with quiet periods: empty start (negative control), moderate, quiet, rush, light.
    "demo": SceneSpec(seconds=60.0, seed=9, phases=(
        Phase(6, 0.0, 0.0), Phase(12, 0.7, 0.2), Phase(16, 0.0, 0.0),
        Phase(14, 1.6, 0.5), Phase(12, 0.2, 0.05))),
    # Mostly empty street, an occasional single car; lighting drift does most of the "changing".
    "quiet": SceneSpec(seconds=60.0, seed=3, phases=(Phase(60, 0.06, 0.0),),
                       bus_share=0.0, bicycle_share=0.0, lighting_drift=0.1, lighting_period_s=30.0),
    "busy": SceneSpec(seconds=30.0, seed=11, phases=(Phase(30, 2.5, 1.0),)),
    "small": SceneSpec(width=320, height=180, fps=10.0, seconds=10.0, seed=5, phases=(
        Phase(2, 0.0, 0.0), Phase(5, 1.2, 0.5), Phase(3, 0.0, 0.0))),
}


# --------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class _Layout:
    w: int
    h: int
    unit: float                          # object-size scale: 1.0 at 360 px height
    building_bottom: float
    top_walk: tuple[float, float]
    road: tuple[float, float]
    bottom_walk: tuple[float, float]
    lane_centers: tuple[float, ...]      # lanes 0,1 drive left (-x), lanes 2,3 drive right (+x)
    lane_width: float
    crosswalk: tuple[float, float]       # x range
    stop_margin: float                   # vehicles stop this far before the crosswalk
    doors: tuple[float, ...]             # x of building doors on the upper sidewalk
    gates: tuple[float, ...]             # x of park gates on the lower sidewalk

    @classmethod
    def for_size(cls, w: int, h: int) -> _Layout:
        road = (0.31 * h, 0.80 * h)
        lane_w = (road[1] - road[0]) / 4
        return cls(
            w=w, h=h, unit=h / 360.0, building_bottom=0.19 * h,
            top_walk=(0.19 * h, road[0]), road=road, bottom_walk=(road[1], 0.915 * h),
            lane_centers=tuple(road[0] + lane_w * (i + 0.5) for i in range(4)), lane_width=lane_w,
            crosswalk=(0.585 * w, 0.655 * w), stop_margin=0.02 * w,
            doors=(0.12 * w, 0.38 * w, 0.84 * w), gates=(0.24 * w, 0.92 * w))

    @staticmethod
    def lane_direction(lane: int) -> int:
        return -1 if lane < 2 else 1


# --------------------------------------------------------------------------- drawing helpers

def _fx(v: float) -> int:
    return int(round(v * _ONE))


def _pt(x: float, y: float) -> tuple[int, int]:
    # Geometry uses pixel-edge coordinates (pixel i spans [i, i+1]); cv2 puts pixel centres on integers.
    return _fx(x - 0.5), _fx(y - 0.5)


def _fill_rect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color: tuple[int, ...]) -> None:
    pts = np.array([[_pt(x0, y0), _pt(x1, y0), _pt(x1, y1), _pt(x0, y1)]], dtype=np.int32)
    cv2.fillPoly(img, pts, color, cv2.LINE_AA, _SHIFT)


def _fill_rounded_rect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, r: float,
                       color: tuple[int, ...]) -> None:
    r = max(0.0, min(r, (x1 - x0) / 2, (y1 - y0) / 2))
    n = 5
    pts: list[tuple[int, int]] = []
    for cx, cy, a0 in ((x1 - r, y0 + r, -90), (x1 - r, y1 - r, 0), (x0 + r, y1 - r, 90), (x0 + r, y0 + r, 180)):
        for k in range(n + 1):
            a = math.radians(a0 + 90 * k / n)
            pts.append(_pt(cx + r * math.cos(a), cy + r * math.sin(a)))
    cv2.fillPoly(img, np.array([pts], dtype=np.int32), color, cv2.LINE_AA, _SHIFT)


def _fill_circle(img: np.ndarray, x: float, y: float, r: float, color: tuple[int, ...]) -> None:
    cv2.circle(img, _pt(x, y), max(1, _fx(r)), color, -1, cv2.LINE_AA, _SHIFT)


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color: tuple[int, ...],
          thickness: float) -> None:
    cv2.line(img, _pt(x0, y0), _pt(x1, y1), color, max(1, round(thickness)), cv2.LINE_AA, _SHIFT)


def _shade(color: tuple[int, ...], k: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * k, 0, 255)) for c in color)  # type: ignore[return-value]


# --------------------------------------------------------------------------- background

def render_background(spec: SceneSpec) -> np.ndarray:
    """The empty street (no objects, no noise, no drift) as BGR uint8."""
    lay = _Layout.for_size(spec.width, spec.height)
    rng = np.random.default_rng([spec.seed, 7])
    w, h, u = lay.w, lay.h, lay.unit
    img = np.zeros((h, w, 3), np.uint8)

    # Buildings, with doors where pedestrians come and go.
    x = -rng.uniform(0, 30) * u
    facades = [(96, 110, 150), (140, 150, 160), (80, 95, 120), (150, 135, 120), (110, 120, 135), (70, 80, 95)]
    _fill_rect(img, 0, 0, w, lay.building_bottom, (60, 70, 75))
    while x < w:
        bw = rng.uniform(90, 170) * u
        color = facades[int(rng.integers(len(facades)))]
        top = rng.uniform(0, 12) * u
        _fill_rect(img, x, top, x + bw - 3 * u, lay.building_bottom, color)
        _fill_rect(img, x, top, x + bw - 3 * u, top + 4 * u, _shade(color, 0.7))
        for wy in np.arange(top + 10 * u, lay.building_bottom - 16 * u, 15 * u):
            for wx in np.arange(x + 8 * u, x + bw - 16 * u, 16 * u):
                lit = rng.random() < 0.3
                _fill_rect(img, wx, wy, wx + 8 * u, wy + 8 * u, (120, 200, 230) if lit else (90, 70, 50))
        x += bw
    for dx in lay.doors:
        _fill_rect(img, dx - 6 * u, lay.building_bottom - 17 * u, dx + 6 * u, lay.building_bottom, (40, 55, 75))
    for tx in (0.25 * w, 0.52 * w, 0.7 * w, 0.97 * w):
        ty = lay.building_bottom - 26 * u
        _fill_rect(img, tx - 2 * u, ty, tx + 2 * u, lay.building_bottom - 1 * u, (40, 60, 90))
        _fill_circle(img, tx, ty, 16 * u, (40, 110, 50))
        _fill_circle(img, tx - 4 * u, ty - 4 * u, 9 * u, (60, 140, 70))

    # Sidewalks with paving joints and curbs.
    for y0, y1 in (lay.top_walk, lay.bottom_walk):
        _fill_rect(img, 0, y0, w, y1, (170, 175, 178))
        for jx in np.arange(0, w, 24 * u):
            _line(img, jx, y0, jx, y1, (150, 155, 158), 1)
    _fill_rect(img, 0, lay.road[0] - 3 * u, w, lay.road[0], (120, 125, 128))
    _fill_rect(img, 0, lay.road[1], w, lay.road[1] + 3 * u, (120, 125, 128))

    # Asphalt with a faint fixed texture.
    r0, r1 = int(round(lay.road[0])), int(round(lay.road[1]))
    texture = rng.normal(0, 3.0, (r1 - r0, w)).astype(np.float32)
    texture = cv2.GaussianBlur(texture, (0, 0), 1.2)
    img[r0:r1] = np.clip(np.float32(72) + texture, 0, 255).astype(np.uint8)[..., None]

    # Markings: edge lines, dashed lane lines, double yellow centre, stop lines, zebra.
    lw = lay.lane_width
    cx0, cx1 = lay.crosswalk
    for y in (lay.road[0] + 4 * u, lay.road[1] - 4 * u):
        _line(img, 0, y, w, y, (220, 220, 220), 2 * u)
    for lane_edge in (lay.road[0] + lw, lay.road[0] + 3 * lw):
        for dx in np.arange(0, w, 40 * u):
            if cx0 - lay.stop_margin - 20 * u < dx < cx1 + lay.stop_margin:
                continue
            _fill_rect(img, dx, lane_edge - 1.2 * u, dx + 20 * u, lane_edge + 1.2 * u, (220, 220, 220))
    mid = (lay.road[0] + lay.road[1]) / 2
    for off in (-2.5 * u, 2.5 * u):
        _line(img, 0, mid + off, w, mid + off, (40, 200, 230), 1.6 * u)
    _fill_rect(img, cx0 - lay.stop_margin, mid, cx0 - lay.stop_margin + 4 * u, lay.road[1] - 4 * u, (225, 225, 225))
    _fill_rect(img, cx1 + lay.stop_margin - 4 * u, lay.road[0] + 4 * u, cx1 + lay.stop_margin, mid, (225, 225, 225))
    for sy in np.arange(lay.road[0] + 6 * u, lay.road[1] - 8 * u, 14 * u):
        _fill_rect(img, cx0, sy, cx1, sy + 8 * u, (215, 215, 215))

    # Park: grass, a hedge with gaps at the gates, bushes.
    _fill_rect(img, 0, lay.bottom_walk[1], w, h, (60, 130, 70))
    hedge_y = lay.bottom_walk[1] + 2 * u
    edges = [0.0] + [g for gx in lay.gates for g in (gx - 9 * u, gx + 9 * u)] + [float(w)]
    for a, b in zip(edges[::2], edges[1::2]):
        _fill_rounded_rect(img, a, hedge_y, b, hedge_y + 7 * u, 3 * u, (35, 90, 45))
    for bx in np.arange(20 * u, w, 70 * u):
        _fill_circle(img, bx + rng.uniform(-10, 10) * u, h - 8 * u, 7 * u, (45, 115, 60))
    return img


# --------------------------------------------------------------------------- moving things

_CAR_COLORS = [(40, 40, 200), (200, 90, 30), (230, 230, 230), (30, 30, 30), (60, 160, 60),
               (0, 170, 230), (150, 150, 150), (120, 40, 120), (40, 90, 160), (200, 200, 60)]
_BUS_COLORS = [(0, 200, 240), (40, 40, 190), (180, 110, 40)]
_SHIRTS = [(200, 60, 40), (40, 40, 200), (40, 170, 60), (230, 230, 230), (30, 30, 30), (0, 140, 230),
           (160, 60, 160), (60, 200, 200)]
_SKINS = [(140, 180, 230), (100, 140, 190), (60, 90, 130), (170, 200, 235)]


@dataclass
class _Vehicle:
    track_id: int
    cls: ObjectClass
    lane: int
    direction: int             # +1 moves right, -1 moves left
    front: float               # progress of the front bumper: direction * x
    length: float
    width: float
    desired_speed: float       # px/s
    speed: float
    color: tuple[int, int, int]

    def x_span(self) -> tuple[float, float]:
        a, b = self.direction * self.front, self.direction * (self.front - self.length)
        return (a, b) if a < b else (b, a)


@dataclass
class _Waypoint:
    x: float
    y: float
    crossing: bool = False     # the leg that ends here crosses the road


@dataclass
class _Person:
    track_id: int
    x: float
    y: float                   # feet
    height: float
    speed: float
    route: list[_Waypoint]
    shirt: tuple[int, int, int]
    pants: tuple[int, int, int]
    skin: tuple[int, int, int]
    stride: float = 0.0        # walking-cycle phase, radians
    crossing: bool = False
    waiting: bool = False      # standing at the curb for the crosswalk


class _Street:
    """Traffic simulation and object drawing; one instance per render."""

    def __init__(self, spec: SceneSpec):
        self.spec = spec
        self.lay = _Layout.for_size(spec.width, spec.height)
        self.rng = np.random.default_rng([spec.seed, 1])
        self.dt = 1.0 / spec.fps
        self.vehicles: list[_Vehicle] = []
        self.people: list[_Person] = []
        self.next_id = 1
        self.walk_started_t = -1e9   # crosswalk: current group's start; cars get a turn between groups
        self.walk_ended_t = -1e9

    # ---- simulation

    def step(self, t: float, advance: bool) -> None:
        if advance:
            self._move_people(t)
            self._move_vehicles()
        phase = self.spec.phases[self.spec.phase_index_at(t)]
        for _ in range(int(self.rng.poisson(phase.car_rate * self.dt))):
            self._spawn_vehicle()
        for _ in range(int(self.rng.poisson(phase.person_rate * self.dt))):
            self._spawn_person()

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _lane_entry(self, direction: int) -> float:
        return 0.0 if direction > 0 else -float(self.lay.w)

    def _lane_exit(self, direction: int) -> float:
        return float(self.lay.w) if direction > 0 else 0.0

    def _spawn_vehicle(self) -> None:
        rng, u, w = self.rng, self.lay.unit, self.lay.w
        roll = rng.random()
        cls: ObjectClass = "bus" if roll < self.spec.bus_share else (
            "bicycle" if roll < self.spec.bus_share + self.spec.bicycle_share else "car")
        if cls == "bicycle":
            lane = int(rng.choice([0, 3]))              # curb lanes
            length, width, speed = rng.uniform(28, 32) * u, 11 * u, rng.uniform(0.08, 0.12) * w
            color = (40, 40, 40)
        elif cls == "bus":
            lane = int(rng.integers(4))
            length, width, speed = rng.uniform(135, 160) * u, 36 * u, rng.uniform(0.13, 0.2) * w
            color = _BUS_COLORS[int(rng.integers(len(_BUS_COLORS)))]
        else:
            lane = int(rng.integers(4))
            length, width, speed = rng.uniform(62, 78) * u, rng.uniform(28, 32) * u, rng.uniform(0.17, 0.34) * w
            color = _CAR_COLORS[int(rng.integers(len(_CAR_COLORS)))]
        direction = _Layout.lane_direction(lane)
        entry = self._lane_entry(direction)
        gap = 14 * u
        if any(v.lane == lane and v.front - v.length < entry + gap for v in self.vehicles):
            return  # lane entrance is blocked; this arrival is dropped
        self.vehicles.append(_Vehicle(self._new_id(), cls, lane, direction, entry, length, width,
                                      speed, speed, color))

    def _move_vehicles(self) -> None:
        dt, gap = self.dt, 14 * self.lay.unit
        walk_active = any(p.crossing for p in self.people)
        kept: list[_Vehicle] = []
        for lane in range(4):
            lane_vehicles = sorted((v for v in self.vehicles if v.lane == lane), key=lambda v: -v.front)
            leader_rear: float | None = None
            for v in lane_vehicles:
                stop_line = self._stop_line(v.direction)
                v.speed = min(v.desired_speed, v.speed + v.desired_speed * dt / 1.5)
                target = v.front + v.speed * dt
                if leader_rear is not None:
                    target = min(target, leader_rear - gap)
                if walk_active and v.front <= stop_line + 1e-6:
                    target = min(target, stop_line)
                target = max(target, v.front)
                v.speed = (target - v.front) / dt
                v.front = target
                leader_rear = v.front - v.length
                if v.front - v.length <= self._lane_exit(v.direction):
                    kept.append(v)
        kept.sort(key=lambda v: v.track_id)
        self.vehicles = kept

    def _crosswalk_clear(self) -> bool:
        zx0 = self.lay.crosswalk[0] - self.lay.stop_margin
        zx1 = self.lay.crosswalk[1] + self.lay.stop_margin
        return not any(a < zx1 and b > zx0 for a, b in (v.x_span() for v in self.vehicles))

    def _may_start_crossing(self, t: float) -> bool:
        if not self._crosswalk_clear():
            return False
        if any(p.crossing for p in self.people):
            return t - self.walk_started_t < 1.5     # join the group already walking
        return t - self.walk_ended_t >= 5.0 or not self._vehicles_approaching()  # cars get a turn

    def _vehicles_approaching(self) -> bool:
        return any(v.front <= self._stop_line(v.direction) and v.front > self._lane_entry(v.direction)
                   for v in self.vehicles)

    def _stop_line(self, direction: int) -> float:
        """Progress (direction * x) at which a vehicle's front stops for the crosswalk."""
        cx0, cx1 = self.lay.crosswalk
        return (cx0 - self.lay.stop_margin) if direction > 0 else -(cx1 + self.lay.stop_margin)

    def _move_people(self, t: float) -> None:
        kept: list[_Person] = []
        for p in self.people:
            budget = p.speed * self.dt
            p.waiting = False
            while budget > 1e-9 and p.route:
                wp = p.route[0]
                if wp.crossing and not p.crossing:
                    if not self._may_start_crossing(t):
                        p.waiting = True
                        break
                    if not any(q.crossing for q in self.people):
                        self.walk_started_t = t
                    p.crossing = True
                dx, dy = wp.x - p.x, wp.y - p.y
                dist = math.hypot(dx, dy)
                if dist <= budget:
                    p.x, p.y = wp.x, wp.y
                    budget -= dist
                    p.route.pop(0)
                    if p.crossing:
                        p.crossing = False
                        if not any(q.crossing for q in self.people):
                            self.walk_ended_t = t
                else:
                    p.x += dx / dist * budget
                    p.y += dy / dist * budget
                    p.stride += budget / (0.45 * p.height) * math.pi
                    budget = 0.0
            if p.route:
                kept.append(p)
        self.people = kept

    def _spawn_person(self) -> None:
        rng, lay, u = self.rng, self.lay, self.lay.unit
        height = rng.uniform(28, 36) * u
        off = 0.35 * height + 2 * u                  # x beyond which the figure is fully off-frame

        def track_y(side: int) -> float:
            y0, y1 = lay.top_walk if side == 0 else lay.bottom_walk
            return float(rng.uniform(y0 + 0.55 * (y1 - y0), y1 - 3 * u))

        def portal(side: int) -> _Waypoint:
            if side == 0:
                return _Waypoint(float(rng.choice(lay.doors)), lay.building_bottom + 2 * u)
            return _Waypoint(float(rng.choice(lay.gates)), lay.bottom_walk[1] + 6 * u)

        side = int(rng.integers(2))
        y = track_y(side)
        origin_kind = rng.random()
        if origin_kind < 0.35:
            start = _Waypoint(-off, y)
        elif origin_kind < 0.7:
            start = _Waypoint(lay.w + off, y)
        else:
            start = portal(side)
        route: list[_Waypoint] = []
        if start.y != y:
            route.append(_Waypoint(start.x, y))
        if rng.random() < self.spec.crossing_share:
            cross_x = float(rng.uniform(lay.crosswalk[0] + 4 * u, lay.crosswalk[1] - 4 * u))
            route.append(_Waypoint(cross_x, y))
            side = 1 - side
            y = track_y(side)
            route.append(_Waypoint(cross_x, y, crossing=True))
        if rng.random() < 0.65:
            from_edge = start.x < 0 or start.x > lay.w
            crossed = bool(route) and route[-1].crossing
            go_right = start.x < 0 if from_edge and not crossed else bool(rng.random() < 0.5)
            route.append(_Waypoint(lay.w + off if go_right else -off, y))
        else:
            door = portal(side)
            route.append(_Waypoint(door.x, y))
            route.append(door)
        self.people.append(_Person(
            self._new_id(), start.x, start.y, height, float(rng.uniform(1.1, 1.6) * height),
            route, _SHIRTS[int(rng.integers(len(_SHIRTS)))], _shade(_SHIRTS[int(rng.integers(len(_SHIRTS)))], 0.5),
            _SKINS[int(rng.integers(len(_SKINS)))], stride=float(rng.uniform(0, 2 * math.pi))))

    # ---- drawing; each returns the drawn extent (x0, y0, x1, y1) as floats

    def draw(self, img: np.ndarray) -> list[tuple[int, ObjectClass, tuple[float, float, float, float]]]:
        drawn: list[tuple[int, ObjectClass, tuple[float, float, float, float]]] = []
        for v in sorted(self.vehicles, key=lambda v: (v.lane, v.track_id)):
            drawn.append((v.track_id, v.cls, self._draw_vehicle(img, v)))
        for p in sorted(self.people, key=lambda p: (p.y, p.track_id)):
            drawn.append((p.track_id, "person", self._draw_person(img, p)))
        return drawn

    def _draw_vehicle(self, img: np.ndarray, v: _Vehicle) -> tuple[float, float, float, float]:
        x0, x1 = v.x_span()
        yc = self.lay.lane_centers[v.lane]
        if v.cls == "bicycle":
            yc += (-1 if v.lane == 0 else 1) * 0.25 * self.lay.lane_width
            return self._draw_bicycle(img, v, x0, x1, yc)
        y0, y1 = yc - v.width / 2, yc + v.width / 2
        L, W, d = v.length, v.width, v.direction
        front_x = x1 if d > 0 else x0

        def along(frac: float) -> float:       # x at a fraction of the length, 0 = rear, 1 = front
            return front_x - d * L * (1 - frac)

        wheel_out, wheel_len = 0.1 * W, 0.16 * L if v.cls == "car" else 0.08 * L
        for frac in ((0.18, 0.82) if v.cls == "car" else (0.12, 0.3, 0.85)):
            wx = along(frac)
            _fill_rect(img, wx - wheel_len / 2, y0 - wheel_out, wx + wheel_len / 2, y1 + wheel_out, (25, 25, 25))
        _fill_rounded_rect(img, x0, y0, x1, y1, 0.22 * W if v.cls == "car" else 0.12 * W, v.color)
        if v.cls == "car":
            glass = (90, 70, 50)
            ws0, ws1 = sorted((along(0.62), along(0.78)))
            _fill_rect(img, ws0, y0 + 0.12 * W, ws1, y1 - 0.12 * W, glass)
            rw0, rw1 = sorted((along(0.12), along(0.24)))
            _fill_rect(img, rw0, y0 + 0.16 * W, rw1, y1 - 0.16 * W, glass)
            rf0, rf1 = sorted((along(0.26), along(0.6)))
            _fill_rect(img, rf0, y0 + 0.14 * W, rf1, y1 - 0.14 * W, _shade(v.color, 0.85))
        else:
            ws0, ws1 = sorted((along(0.9), along(0.97)))
            _fill_rect(img, ws0, y0 + 0.1 * W, ws1, y1 - 0.1 * W, (90, 70, 50))
            for frac in np.arange(0.12, 0.82, 0.14):
                a, b = sorted((along(frac), along(frac + 0.08)))
                _fill_rect(img, a, yc - 0.22 * W, b, yc + 0.22 * W, _shade(v.color, 0.8))
        lamp = 0.02 * L + 0.07 * W           # lamps sit just inside the bumpers
        hx = front_x - d * lamp
        tx = front_x - d * (L - lamp)
        for ly in (y0 + 0.2 * W, y1 - 0.2 * W):
            _fill_circle(img, hx, ly, 0.07 * W, (170, 240, 255))
            _fill_circle(img, tx, ly, 0.06 * W, (30, 30, 210))
        return x0, y0 - wheel_out, x1, y1 + wheel_out

    def _draw_bicycle(self, img: np.ndarray, v: _Vehicle, x0: float, x1: float,
                      yc: float) -> tuple[float, float, float, float]:
        u = self.lay.unit
        wheel = 0.3 * v.length
        _line(img, x0 + wheel / 2, yc, x1 - wheel / 2, yc, (60, 60, 60), 2 * u)
        for wx in (x0 + wheel / 2, x1 - wheel / 2):
            _fill_rounded_rect(img, wx - wheel / 2, yc - 1.5 * u, wx + wheel / 2, yc + 1.5 * u, 1.5 * u, (20, 20, 20))
        mid = (x0 + x1) / 2 - v.direction * 2 * u
        _fill_rounded_rect(img, mid - 4 * u, yc - v.width / 2, mid + 4 * u, yc + v.width / 2, 3 * u,
                           _SHIRTS[v.track_id % len(_SHIRTS)])
        _fill_circle(img, mid + v.direction * 1.5 * u, yc, 3.2 * u, (40, 50, 70))
        return x0, yc - v.width / 2, x1, yc + v.width / 2

    def _draw_person(self, img: np.ndarray, p: _Person) -> tuple[float, float, float, float]:
        h, x, yf = p.height, p.x, p.y
        head_r = 0.12 * h
        head_y = yf - h + head_r
        shoulder_y = yf - h + 2.3 * head_r
        hip_y = yf - 0.45 * h
        limb = max(1.0, 0.09 * h)
        swing = 0.0 if p.waiting else math.sin(p.stride) * 0.16 * h
        if p.route and abs(p.route[0].x - p.x) < abs(p.route[0].y - p.y):
            swing *= 0.35                   # walking toward/away from the camera
        for s in (swing, -swing):
            _line(img, x, hip_y, x + s, yf - limb / 2, p.pants, limb)
        for s in (-swing, swing):
            _line(img, x, shoulder_y, x + 0.7 * s, hip_y + 0.05 * h, _shade(p.shirt, 0.8), limb * 0.8)
        _fill_rounded_rect(img, x - 0.11 * h, shoulder_y - 0.04 * h, x + 0.11 * h, hip_y + 0.04 * h, 0.06 * h, p.shirt)
        _fill_circle(img, x, head_y, head_r, p.skin)
        _fill_circle(img, x, head_y - 0.25 * head_r, 0.75 * head_r, (30, 35, 45))   # hair
        half = max(0.11 * h, abs(swing) + limb / 2, 0.7 * abs(swing) + limb * 0.4) + 1
        return x - half, yf - h, x + half, yf



# --------------------------------------------------------------------------- rendering

def _camera_offset(spec: SceneSpec, t: float, phases: np.ndarray) -> tuple[float, float]:
    if spec.shake_px <= 0:
        return 0.0, 0.0
    a = 2 * math.pi * t
    dx = 0.6 * math.sin(1.3 * a + phases[0]) + 0.4 * math.sin(3.1 * a + phases[1])
    dy = 0.6 * math.sin(1.7 * a + phases[2]) + 0.4 * math.sin(2.9 * a + phases[3])
    return spec.shake_px * dx, spec.shake_px * dy


def _to_truth(track_id: int, cls: ObjectClass, extent: tuple[float, float, float, float],
              dx: float, dy: float, w: int, h: int) -> ObjectTruth | None:
    x0, y0 = math.floor(extent[0] + dx - _AA_PAD), math.floor(extent[1] + dy - _AA_PAD)
    x1, y1 = math.ceil(extent[2] + dx + _AA_PAD), math.ceil(extent[3] + dy + _AA_PAD)
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    full = (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1)
    return ObjectTruth(track_id, cls, (cx0, cy0, cx1, cy1), full)


def render_scene(spec: SceneSpec) -> Iterator[tuple[np.ndarray, FrameTruth]]:
    """Yield spec.n_frames (BGR uint8 frame, FrameTruth) pairs; deterministic in spec."""
    background = render_background(spec)
    street = _Street(spec)
    noise_rng = np.random.default_rng([spec.seed, 2])
    look_rng = np.random.default_rng([spec.seed, 3])
    drift_phase = float(look_rng.uniform(0, 2 * math.pi))
    shake_phases = look_rng.uniform(0, 2 * math.pi, 4)
    h, w = spec.height, spec.width
    for index in range(spec.n_frames):
        t = index / spec.fps
        street.step(t, advance=index > 0)
        canvas = background.copy()
        drawn = street.draw(canvas)
        dx, dy = _camera_offset(spec, t, shake_phases)
        if dx or dy:
            shift = np.float32([[1, 0, dx], [0, 1, dy]])
            canvas = cv2.warpAffine(canvas, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        objects = tuple(o for o in (_to_truth(i, c, e, dx, dy, w, h) for i, c, e in drawn) if o is not None)
        gain = 1.0 + spec.lighting_drift * math.sin(2 * math.pi * t / spec.lighting_period_s + drift_phase)
        frame = canvas.astype(np.float32)
        frame *= np.float32(gain)
        if spec.noise_sigma > 0:
            frame += noise_rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(spec.noise_sigma)
        frame += np.float32(0.5)
        np.clip(frame, 0, 255, out=frame)
        yield frame.astype(np.uint8), FrameTruth(index, t, objects, spec.phase_index_at(t))


# --------------------------------------------------------------------------- clips on disk

@dataclass
class ClipTruth:
    spec: SceneSpec
    spec_hash: str
    video: Path
    frames: list[FrameTruth] = field(default_factory=list)

    def counts(self, classes: Sequence[str] = CLASSES, fully_visible_only: bool = False) -> list[dict[str, int]]:
        return counts_per_frame(self.frames, classes, fully_visible_only)


def truth_path_for(video: str | os.PathLike[str]) -> Path:
    video = Path(video)
    if video.name.endswith(".truth.json"):
        return video
    return video.with_name(video.stem + ".truth.json")


def _open_writer(path: Path, spec: SceneSpec) -> tuple[cv2.VideoWriter, Path, Path]:
    """mp4v into .mp4; MJPG into .avi when this OpenCV build cannot write mp4v."""
    for fourcc, suffix in (("mp4v", ".mp4"), ("MJPG", ".avi")):
        target = path.with_suffix(suffix)
        tmp = target.with_name(target.stem + ".partial" + suffix)
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), spec.fps, (spec.width, spec.height))
        if writer.isOpened():
            return writer, tmp, target
        writer.release()
        tmp.unlink(missing_ok=True)
    raise RuntimeError(f"OpenCV can write neither mp4v nor MJPG to {path.parent}")


def write_clip(spec: SceneSpec, path: str | os.PathLike[str]) -> Path:
    """Render `spec` to a video at `path` (suffix may become .avi) plus `<stem>.truth.json`.

    The sidecar is written last, so its presence with a matching spec_hash means a complete clip.
    Returns the video's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    truth_path = truth_path_for(path)
    truth_path.unlink(missing_ok=True)
    writer, tmp, video = _open_writer(path, spec)
    frames: list[FrameTruth] = []
    try:
        for image, truth in render_scene(spec):
            writer.write(image)
            frames.append(truth)
    finally:
        writer.release()
    os.replace(tmp, video)
    counts = counts_per_frame(frames)
    counts_full = counts_per_frame(frames, fully_visible_only=True)
    doc = {
        "video": video.name,
        "spec": spec.to_dict(),
        "spec_hash": spec.spec_hash(),
        "render_version": RENDER_VERSION,
        "n_frames": len(frames),
        "classes": list(CLASSES),
        "frames": [{"index": f.index, "t": round(f.t, 6), "phase": f.phase,
                    "objects": [{"id": o.track_id, "cls": o.cls, "box": list(o.box), "full": o.fully_visible}
                                for o in f.objects]} for f in frames],
        "counts": {c: [fc[c] for fc in counts] for c in CLASSES},
        "counts_fully_visible": {c: [fc[c] for fc in counts_full] for c in CLASSES},
    }
    tmp_truth = truth_path.with_name(truth_path.name + ".partial")
    tmp_truth.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp_truth, truth_path)
    return video


def load_truth(path: str | os.PathLike[str]) -> ClipTruth:
    """Read a clip's sidecar; `path` is the video or the .truth.json itself."""
    truth_path = truth_path_for(path)
    doc = json.loads(truth_path.read_text())
    frames = [FrameTruth(f["index"], f["t"], tuple(
        ObjectTruth(o["id"], o["cls"], tuple(o["box"]), o.get("full", True)) for o in f["objects"]),
        f.get("phase", 0)) for f in doc["frames"]]
    return ClipTruth(SceneSpec.from_dict(doc["spec"]), doc["spec_hash"], truth_path.with_name(doc["video"]), frames)


def existing_clip(spec: SceneSpec, path: str | os.PathLike[str]) -> Path | None:
    """The video already rendered from exactly this spec at `path`, if any."""
    truth_path = truth_path_for(path)
    try:
        doc = json.loads(truth_path.read_text())
    except (OSError, ValueError):
        return None
    video = truth_path.with_name(str(doc.get("video", "")))
    if doc.get("spec_hash") != spec.spec_hash() or not video.is_file():
        return None
    return video


def ensure_clip(spec: SceneSpec, path: str | os.PathLike[str], force: bool = False) -> tuple[Path, bool]:
    """(video path, whether it was written now): reuse a matching clip unless `force`."""
    if not force:
        found = existing_clip(spec, path)
        if found is not None:
            return found, False
    return write_clip(spec, path), True
