"""Keep credentials out of what detlab logs: MLflow params, logged configs, printed environments.

A config can carry a secret by accident (an ``s3://`` URI with a key in it, ``--set`` of a token,
an ``http://user:password@host`` tracking URI), and the environment forwarded to workers carries
them on purpose (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``). Anything that looks like
a secret is replaced by :data:`MASK` before it is logged or printed; the values the code uses are
never touched.

What looks like a secret:

* a key (config key or environment name) containing ``password``, ``passwd``, ``secret``,
  ``token``, ``credential``, ``api_key``/``apikey``, ``access_key``, ``private_key`` or ``session_key``;
* a value with a password in a URL (``scheme://user:pw@host``): only the password is masked;
* a value that is an AWS access key id (``AKIA``/``ASIA`` + 16) or carries a ``token=``,
  ``secret=``, ``password=``, ``sig=``/``signature=`` query parameter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

_SECRET_KEY = re.compile(
    r"(password|passwd|secret|token|credential|api_?key|access_?key|private_?key|session_?key)", re.IGNORECASE
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+:)(?P<pw>[^@\s/]+)(?P<at>@)", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_QUERY_SECRET = re.compile(r"(?P<k>[?&;](?:token|secret|password|sig|signature|x-amz-signature)=)(?P<v>[^&\s]+)",
                           re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    """Does a config key or environment variable name say it holds a secret?"""
    return bool(_SECRET_KEY.search(name.rsplit(".", 1)[-1]))


def scrub_text(text: str) -> str:
    """``text`` with URL passwords, AWS key ids and secret query parameters masked."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", text)
    text = _AWS_KEY_ID.sub(MASK, text)
    return _QUERY_SECRET.sub(lambda m: f"{m['k']}{MASK}", text)


def scrub_value(key: str, value: Any) -> Any:
    """The value to log for ``key``: masked whole if the key says secret, else its text scrubbed."""
    if is_secret_key(key) and value not in (None, "", 0, False):
        return MASK
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return scrub_mapping(value)
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(key, v) for v in value)
    return value


def scrub_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` (nested dicts, lists) with every secret masked; ``data`` is not changed."""
    return {k: scrub_value(str(k), v) for k, v in data.items()}
