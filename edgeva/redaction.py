"""Hiding credentials in camera URLs wherever a source is shown (stats, config, logs, errors).

A URL's password (`rtsp://user:pass@host`) and secret-looking query parameters
(`?password=…`, `&token=…`) become `***`; paths without a scheme are left alone.
Depends on nothing else in edgeva, so every step can use it.
"""
from __future__ import annotations

import re
from typing import Any

# scheme://authority... up to whitespace or a quote (a URL inside an error message)
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# the authority's userinfo: everything up to the LAST '@' before the path (passwords may hold '@')
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")
_SECRET_PARAM = re.compile(r"([?&;](?:pass|passwd|password|pwd|token|access_token|auth|key|apikey|api_key|"
                           r"secret|sig|signature|credentials?)=)[^&;#]*", re.IGNORECASE)
MASK = "***"


def redact_url(url: str) -> str:
    def userinfo(m: re.Match[str]) -> str:
        user, sep, _password = m.group(2).partition(":")
        return f"{m.group(1)}{user}{':' + MASK if sep else ''}@"

    return _SECRET_PARAM.sub(lambda m: m.group(1) + MASK, _USERINFO.sub(userinfo, url, count=1))


def redact(text: str) -> str:
    """`text` with every URL in it redacted (a source string, a log line, an error message)."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def redact_sources(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A config's dict form (Config.to_dict) with each camera's source redacted; a copy."""
    out = dict(config_dict)
    out["cameras"] = [{**cam, "source": redact(str(cam.get("source", "")))} for cam in out.get("cameras", [])]
    return out
