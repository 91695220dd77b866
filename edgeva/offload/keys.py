"""CurveZMQ keys: `edgeva keys` makes a key pair; loaders for both sides; the worker's allow-list.

A pair is two files made by zmq.auth.create_certificates: NAME.key (public, give it to the
other side) and NAME.key_secret (public + secret, mode 0600, stays on this host).
Worker: its NAME.key_secret, plus a folder of the daemons' NAME.key files it lets in.
Daemon: the worker's NAME.key (tier.server_public_key) and its own NAME.key_secret.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import zmq
import zmq.auth

log = logging.getLogger("edgeva.offload.keys")


class KeyFileError(ValueError):
    """A key file that is missing or not what it should be."""


def load_secret_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a NAME.key_secret file."""
    p = Path(path).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc}") from None
    if not secret:
        raise KeyFileError(f"{p} holds no secret key (use the .key_secret file, not the .key)")
    return public, secret


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    p = Path(path).expanduser()
    try:
        public, _ = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc}") from None
    return public


class ClientAllowList:
    """ZAP credentials provider: lets in the public keys found in `folder` (re-read when it changes)."""

    def __init__(self, folder: Path, on_refused: Optional[Callable[[bytes], None]] = None):
        if not folder.is_dir():
            raise KeyFileError(f"allowed clients folder {folder} does not exist")
        self.folder = folder
        self.on_refused = on_refused
        self._lock = threading.Lock()
        self._stamp: Optional[tuple[float, int]] = None
        self._keys: set[bytes] = set()
        self._reload()
        log.info("CURVE: %d allowed client keys in %s", len(self._keys), folder)

    def _reload(self) -> None:
        files = sorted(self.folder.glob("*.key"))
        stamp = (max([self.folder.stat().st_mtime] + [f.stat().st_mtime for f in files]), len(files))
        if stamp == self._stamp:
            return
        keys: set[bytes] = set()
        for f in files:
            try:
                keys.add(load_public_key(f))
            except KeyFileError as exc:
                log.warning("skipping %s", exc)
        self._keys, self._stamp = keys, stamp

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            try:
                self._reload()
            except OSError as exc:
                log.warning("cannot re-read %s: %s", self.folder, exc)
            allowed = key in self._keys
        if not allowed:
            log.warning("refused CURVE client with key %s: not in %s", key.decode(errors="replace"), self.folder)
            if self.on_refused is not None:
                self.on_refused(key)
        return allowed


def make_keypair(out_dir: str | os.PathLike[str], name: str, force: bool = False) -> tuple[Path, Path]:
    out = Path(out_dir).expanduser()
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise FileExistsError(f"{public} or {secret} already exists (--force replaces them)")
    out.mkdir(parents=True, exist_ok=True)
    made_public, made_secret = zmq.auth.create_certificates(out, name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def keys_main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="edgeva keys", description="Make a CurveZMQ key pair for offload links.")
    ap.add_argument("--out", required=True, help="folder for NAME.key and NAME.key_secret")
    ap.add_argument("--name", required=True, help="key pair name, e.g. the host or tier name")
    ap.add_argument("--force", action="store_true", help="replace an existing pair")
    args = ap.parse_args(argv)
    if not zmq.has("curve"):
        print("edgeva keys: this libzmq was built without CURVE", file=sys.stderr)
        return 2
    if not args.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        print(f"edgeva keys: name {args.name!r} must be letters, digits, '-', '_' or '.'", file=sys.stderr)
        return 2
    try:
        public, secret = make_keypair(args.out, args.name, args.force)
    except (FileExistsError, OSError) as exc:
        print(f"edgeva keys: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}  (copy to the other side)")
    print(f"secret key: {secret}  (mode 0600, keep on this host)")
    return 0


if __name__ == "__main__":
    raise SystemExit(keys_main())
