#!/usr/bin/env python3
"""Download real street clips into videos/ on a connected machine, with a manifest.

Sources (configs/videos.yaml):
  - VIRAT Ground release 2.0 samples, found by name through the Kitware data server's
    Girder API (/resource/search, then /item/{id}/download);
  - YouTube clips through yt-dlp (pip install yt-dlp), cut to a section.
Each downloaded file is probed with OpenCV and recorded in videos/manifest.json
(url, sha256, size, fps, frame count, resolution, licence).

Without network access it stops with one clear line and exit status 1, never a traceback.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


class FetchError(RuntimeError):
    pass


@dataclass
class ClipSource:
    name: str
    kind: str            # virat | youtube | url
    ref: str             # VIRAT file name, YouTube URL or direct URL
    licence: str
    section: str | None = None   # yt-dlp --download-sections, e.g. "*0-60"


def load_sources(path: Path) -> tuple[str, list[ClipSource]]:
    data = yaml.safe_load(path.read_text())
    clips = [ClipSource(**entry) for entry in data["clips"]]
    return data["virat_server"], clips


def _http_get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        host = urllib.parse.urlsplit(url).netloc
        raise FetchError(f"cannot reach {host}: {reason}. fetch_videos.py needs internet access; "
                         "on an offline box use tools/make_clips.py (generated clips) instead") from None


def _download(url: str, dest: Path, timeout: float) -> None:
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, tmp.open("wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"download of {url} failed: {getattr(exc, 'reason', exc)}") from None
    tmp.replace(dest)


def fetch_virat(server: str, clip: ClipSource, out_dir: Path, timeout: float) -> tuple[Path, str]:
    query = urllib.parse.urlencode({"q": clip.ref, "types": json.dumps(["item"]), "limit": 5})
    found = json.loads(_http_get(f"{server}/api/v1/resource/search?{query}", timeout))
    items = [i for i in found.get("item", []) if i.get("name") == clip.ref]
    if not items:
        raise FetchError(f"{clip.ref} not found on {server}")
    url = f"{server}/api/v1/item/{items[0]['_id']}/download"
    dest = out_dir / clip.ref
    _download(url, dest, timeout)
    return dest, url


def fetch_youtube(clip: ClipSource, out_dir: Path, timeout: float) -> tuple[Path, str]:
    ytdlp = shutil.which("yt-dlp")
    if ytdlp is None:
        raise FetchError("yt-dlp is not installed (pip install yt-dlp)")
    dest = out_dir / f"{clip.name}.mp4"
    cmd = [ytdlp, "--quiet", "--no-playlist", "--socket-timeout", str(int(timeout)),
           "-f", "mp4[height<=720]/best[height<=720]", "-o", str(dest), clip.ref]
    if clip.section:
        cmd[1:1] = ["--download-sections", clip.section, "--force-keyframes-at-cuts"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not dest.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"yt-dlp failed for {clip.ref}: {last}")
    return dest, clip.ref


def probe(path: Path) -> dict:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise FetchError(f"{path} was downloaded but OpenCV cannot decode it")
        return {"fps": cap.get(cv2.CAP_PROP_FPS), "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
                "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))}
    finally:
        cap.release()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=Path, default=REPO / "configs" / "videos.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "videos")
    parser.add_argument("--only", nargs="*", help="names of clips to fetch (default: all)")
    parser.add_argument("--virat-server", help="override the VIRAT server (a mirror)")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)

    server, clips = load_sources(args.sources)
    server = args.virat_server or server
    if args.only:
        clips = [c for c in clips if c.name in set(args.only)]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    failures = 0
    for clip in clips:
        try:
            if clip.kind == "virat":
                path, url = fetch_virat(server, clip, args.out, args.timeout)
            elif clip.kind == "youtube":
                path, url = fetch_youtube(clip, args.out, args.timeout)
            else:
                path, url = args.out / Path(urllib.parse.urlsplit(clip.ref).path).name, clip.ref
                _download(clip.ref, path, args.timeout)
            manifest[clip.name] = {"file": path.name, "url": url, "licence": clip.licence,
                                   "sha256": sha256(path), "bytes": path.stat().st_size,
                                   "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   **probe(path)}
            print(f"fetched {clip.name}: {path}")
        except FetchError as exc:
            failures += 1
            print(f"fetch_videos: {clip.name}: {exc}", file=sys.stderr)
            if "cannot reach" in str(exc):
                break  # offline: every other clip would fail the same way
    if manifest:
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
