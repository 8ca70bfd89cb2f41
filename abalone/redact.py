"""Secrets never shown: URLs without their passwords and signatures, and the config keys whose
values are never logged, whatever group they come from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit

SECRET_KEY = re.compile(r"secret|password|token|credential|access_key|session_key", re.I)
# Query parameters that carry a credential or a request's signature: presigned S3 and GCS URLs,
# Azure SAS tokens, API keys.
SECRET_PARAMETER = re.compile(r"signature|credential|token|secret|password|^sig$|^key$|apikey|"
                              r"api_key|accesskeyid", re.I)


def redact(uri: str) -> str:
    """`uri` without the password of any user:password@ part, and with the values of its
    signature and credential query parameters replaced by ***."""
    parts = urlsplit(uri)
    if parts.password is not None:
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        uri = uri.replace(f"//{parts.netloc}", f"//{netloc}", 1)
    if parts.query and parts.scheme:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(SECRET_PARAMETER.search(key) for key, _ in pairs):
            query = urlencode([(k, "***" if SECRET_PARAMETER.search(k) else v)
                               for k, v in pairs], safe="*")
            uri = uri.replace(f"?{parts.query}", f"?{query}", 1)
    return uri


# user:password@ in any URL within a text (a library's error message repeats the URL it used).
_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@", re.I)


# A URL's query parameter within a text: ?X-Amz-Signature=... or &token=...
_QUERY_PARAMETER = re.compile(r"(?P<key>[?&][^=&\s'\"#]+)=(?P<value>[^&\s'\"#]+)")


def redact_text(text: str) -> str:
    """`text` with the password of every user:password@ URL in it masked, and the values of
    signature and credential query parameters."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY_PARAMETER.sub(lambda m: f"{m['key']}=***" if SECRET_PARAMETER.search(
        m["key"][1:]) else m[0], text)


def redact_tree(node: Any) -> Any:
    """A config as plain containers, as files and artifacts may show it: the values of secret
    keys (`*password*`, `*token*`, ...) hidden and every URL's secrets masked."""
    if isinstance(node, dict):
        return {key: "***" if SECRET_KEY.search(str(key)) and value is not None
                and not isinstance(value, (dict, list)) else redact_tree(value)
                for key, value in node.items()}
    if isinstance(node, list):
        return [redact_tree(value) for value in node]
    return redact_text(node) if isinstance(node, str) else node


def redact_files(paths: Iterable[Path]) -> None:
    """Mask in place the secrets of URLs in files another library wrote (Hydra's saved
    config.yaml, hydra.yaml, overrides.yaml and multirun.yaml): a password given in a URL on the
    command line is not left on disk."""
    for path in paths:
        try:
            text = path.read_text()
        except (FileNotFoundError, IsADirectoryError):
            continue
        masked = redact_text(text)
        if masked != text:
            path.write_text(masked)
