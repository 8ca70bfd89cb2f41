"""Secrets never shown: URLs without their passwords, and the config keys whose values are never
logged, whatever group they come from."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

SECRET_KEY = re.compile(r"secret|password|token|credential|access_key|session_key", re.I)


def redact(uri: str) -> str:
    """`uri` without the password of any user:password@ part."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# user:password@ in any URL within a text (a library's error message repeats the URL it used).
_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@", re.I)


def redact_text(text: str) -> str:
    """`text` with the password of every user:password@ URL in it masked."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
