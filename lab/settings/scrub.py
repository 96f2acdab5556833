"""Keep credentials out of what detlab logs: MLflow params, logged configs, printed environments.

A config can carry a secret by accident (an ``s3://`` URI with a key in it, ``--set`` of a token,
an ``http://user:password@host`` tracking URI), and the environment forwarded to workers carries
them on purpose (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``). Anything that looks like
a secret is replaced by :data:`MASK` before it is logged or printed; the values the code uses are
never touched.

What looks like a secret:

* a key (config key or environment name) containing ``password``, ``passwd``, ``secret``,
  ``token``, ``credential``, ``api_key``/``apikey``, ``access_key``, ``private_key``,
  ``session_key`` or ``authorization``, or with ``pwd`` or ``auth`` as a whole word (``DB_PWD``,
  ``basic_auth``; not ``author``);
* a value with credentials in a URL: the password of ``scheme://user:pw@host`` (everything up to
  the authority's last ``@``, so a password holding ``@`` is masked whole), and the whole user
  part of ``scheme://TOKEN@host``, the form git and GitHub tokens take (a plain user name there is
  masked too: it cannot be told from a token);
* a value that is an AWS access key id (``AKIA``/``ASIA`` + 16) or carries a query parameter
  whose name ends in ``token``, ``secret``, ``password``, ``passwd``, ``pwd``, ``sig``,
  ``signature``, ``api_key`` or ``credential`` (``?access_token=``, ``X-Amz-Security-Token=``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

_SECRET_KEY = re.compile(
    r"(password|passwd|secret|token|credential|api_?key|access_?key|private_?key|session_?key|authori[sz]ation"
    r"|(?:^|[_.-])(?:pwd|auth)(?:$|[_.-]))", re.IGNORECASE
)
# the userinfo of a URL: after scheme://, up to the authority's last "@" (the greedy class
# backtracks to it; the authority ends at / ? # or whitespace)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<info>[^/?#\s]*)@", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
# a query parameter whose name ends like a secret: token=, access_token=, X-Amz-Security-Token=, sig=, ...
_QUERY_SECRET = re.compile(
    r"(?P<k>[?&;][a-z0-9_.-]*(?:token|secret|password|passwd|pwd|sig|signature|api_?key|credential)=)(?P<v>[^&#\s]+)",
    re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    """Does a config key or environment variable name say it holds a secret?"""
    return bool(_SECRET_KEY.search(name.rsplit(".", 1)[-1]))


def scrub_text(text: str) -> str:
    """``text`` with URL passwords, AWS key ids and secret query parameters masked."""
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _AWS_KEY_ID.sub(MASK, text)
    return _QUERY_SECRET.sub(lambda m: f"{m['k']}{MASK}", text)


def _mask_userinfo(m: re.Match[str]) -> str:
    """``user:***@`` for ``user:password@``; ``***@`` for a bare ``token@``."""
    user, colon, _ = m["info"].partition(":")
    return f"{m['scheme']}{user + ':' if colon else ''}{MASK}@"


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
