"""Keep credentials out of everything synthfb writes or prints.

Credentials reach synthfb in three ways: in a URL (``http://user:pass@host``,
``...?api-key=KEY``), in a configured value (``api_key: KEY``, a key read
from the variable named by ``api_key_env``), and echoed back by a server in
an error body ("invalid key KEY"). Everything that goes to ``run.json``,
stage records, chunk stats, the data card, logs or stderr should pass through
:func:`redact_obj` (structures) or :func:`redact_text` (strings).

* :func:`redact_url` -- a URL for display: userinfo and credential query
  parameters replaced by ``<redacted>``; host, path and other parameters kept.
* :func:`secrets_in` -- the literal secret values in a URL or an options dict.
* :func:`redact_text` -- a string with every known secret value (also
  URL-encoded), every URL's credentials, ``Bearer``/``Basic`` tokens and
  ``api_key=...``-style pairs replaced.
* :func:`redact_obj` -- the same over dicts/lists/strings, and the value of
  every key that names a credential (``api_key``, ``hf_token``, ``password``,
  ...; not ``max_tokens`` or ``api_key_env``) replaced.
* A process-wide registry (:func:`register_secret`, :func:`register_secrets_in`):
  the openai backend registers its key and its URL's secrets when it reads
  them, so that any later :func:`redact_text` / :func:`redact_obj` call without
  an explicit ``secrets`` argument removes them wherever the text came from.
  Values shorter than :data:`MIN_SECRET_LEN` characters and placeholder keys
  such as ``EMPTY`` (:data:`PLACEHOLDERS`) are never registered (redacting
  ``"test"`` everywhere would garble every record).
* :class:`RedactingFilter` -- a :mod:`logging` filter that redacts records.

Imports nothing else of synthfb, so every layer may use it.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import threading
from typing import Any, Iterable
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

REDACTED = "<redacted>"

#: secret values shorter than this are not registered or replaced in text:
#: every "test" or "none" in every record would become "<redacted>"
MIN_SECRET_LEN = 6

#: well-known placeholder keys (``OPENAI_API_KEY=EMPTY`` for vLLM,
#: ``sk-no-key-required`` for llama.cpp, ...): not secrets, never replaced in
#: text (compared case-insensitively). URLs are redacted whatever they hold.
PLACEHOLDERS = frozenset({
    "empty", "dummy", "none", "null", "test", "token", "secret", "password", "changeme", "placeholder",
    "not-needed", "no-key", "sk-no-key-required", "sk-dummy", "sk-xxx", "xxxxxx", "fake-key", "api-key", "apikey",
})

#: a URL's username counts as a secret value (beyond its place in the URL,
#: which redact_url always hides) only from this length: "user" or "admin"
#: replaced in every message and record would garble them ("role: <redacted>")
MIN_USERNAME_LEN = 8

# keys whose values are credentials: api_key, hf_token, client_secret, password, ...
# (not max_tokens or api_key_env, which name a number and an environment variable).
# The same rule as synthfb.engine.runner._SECRET_KEY, so redact_obj can replace scrub.
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|key|token|secret|password|authorization|auth)$", re.IGNORECASE)

# query/fragment parameter names whose values are credentials: api-key, api_key,
# apikey, key, token, access_token, secret, client_secret, password, sig,
# signature, auth, X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, ...
_SECRET_PARAM = re.compile(
    r"(^|[_.-])(api[_-]?key|apikey|key|token|secret|password|passwd|pwd|pass|sig|signature|"
    r"auth|authorization|credential|credentials|session)$",
    re.IGNORECASE,
)

# a URL inside free text (scheme://...), up to whitespace, quotes or brackets
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`\\]+")
# ?name=value / &name=value in text (a relative URL, a path with its query)
_QUERY_PAIR = re.compile(r"(?P<lead>[?&])(?P<name>[A-Za-z0-9_.%+-]+)=(?!<redacted>)(?P<value>[^\s&#'\"<>]+)")
# "Bearer TOKEN" / "Basic BASE64" (Authorization header values)
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic)(\s+)(?!<redacted>)([A-Za-z0-9._~+/=-]+)", re.IGNORECASE)
# api_key=VALUE, "api_key": "VALUE", Authorization: VALUE, x-api-key: VALUE ...
_PAIR = re.compile(
    r"""(?P<name>\b(?:x-)?(?:api[_-]?key|apikey|access[_-]?token|refresh[_-]?token|client[_-]?secret|"""
    r"""password|authorization)\b)(?P<sep>["']?\s*[:=]\s*["']?)"""
    r"""(?!<redacted>|Bearer\b|Basic\b)(?P<value>[^\s"'&,;}{)\]]+)""",
    re.IGNORECASE,
)

_lock = threading.Lock()
_registered: set[str] = set()


# ---------------------------------------------------------------- registry
def register_secret(value: Any) -> None:
    """Remember ``value`` as a secret of this process (redacted by default by
    :func:`redact_text` and :func:`redact_obj`). Empty values, non-strings,
    values shorter than :data:`MIN_SECRET_LEN` and :data:`PLACEHOLDERS` are
    ignored."""
    if _is_secret_value(value):
        with _lock:
            _registered.add(value)


def _is_secret_value(value: Any) -> bool:
    return isinstance(value, str) and len(value) >= MIN_SECRET_LEN and value.casefold() not in PLACEHOLDERS


def register_secrets_in(url_or_options: Any) -> set[str]:
    """Register every secret :func:`secrets_in` finds; returns them."""
    found = secrets_in(url_or_options)
    for s in found:
        register_secret(s)
    return found


def registered_secrets() -> set[str]:
    """A copy of the secrets registered in this process."""
    with _lock:
        return set(_registered)


def clear_registered_secrets() -> None:
    """Forget all registered secrets (for tests)."""
    with _lock:
        _registered.clear()


# ------------------------------------------------------------------- URLs
def _is_secret_param(name: str) -> bool:
    return bool(_SECRET_PARAM.search(unquote_plus(name).strip()))


def _redact_params(qs: str) -> str:
    """``a=1&api-key=X`` -> ``a=1&api-key=<redacted>``; other pairs keep their
    exact (encoded) form."""
    if "=" not in qs:
        return qs
    out = []
    for piece in qs.split("&"):
        name, eq, _value = piece.partition("=")
        secret = eq and _value and _value != REDACTED and _is_secret_param(name)
        out.append(f"{name}={REDACTED}" if secret else piece)
    return "&".join(out)


def _split_userinfo(netloc: str) -> tuple[str | None, str]:
    """(userinfo or None, host[:port])."""
    if "@" not in netloc:
        return None, netloc
    userinfo, _, host = netloc.rpartition("@")
    return userinfo, host


def redact_url(url: str) -> str:
    """``url`` for display: ``user:pass@`` (any userinfo) -> ``<redacted>@``,
    the value of every query (and fragment) parameter whose name looks like a
    credential (``api-key``, ``api_key``, ``apikey``, ``key``, ``token``,
    ``access_token``, ``secret``, ``password``, ``sig``, ``signature``, ``auth``,
    ...) -> ``<redacted>``. Scheme, host, port, path and the other parameters
    are kept as written; a URL with nothing to redact comes back unchanged.
    A string that cannot be parsed as a URL comes back as ``<redacted>``."""
    if not isinstance(url, str) or not url:
        return url
    try:
        parts = urlsplit(url)
        userinfo, host = _split_userinfo(parts.netloc)
        netloc = f"{REDACTED}@{host}" if userinfo is not None else parts.netloc
        query = _redact_params(parts.query)
        fragment = _redact_params(parts.fragment)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return REDACTED
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _url_secrets(url: str) -> set[str]:
    found: set[str] = set()
    try:
        parts = urlsplit(url)
    except ValueError:
        return found
    userinfo, _ = _split_userinfo(parts.netloc)
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        if colon and password:
            found.update({password, unquote(password)})
            # the Basic credential the client sends (a server may echo the header's token)
            import base64

            basic = f"{unquote(user)}:{unquote(password)}".encode()
            found.add(base64.b64encode(basic).decode().rstrip("="))
        # a username with a password is part of the credential; one alone is
        # usually a token (https://TOKEN@host)
        if user and len(unquote(user)) >= MIN_USERNAME_LEN:
            found.update({user, unquote(user)})
    for qs in (parts.query, parts.fragment):
        for piece in qs.split("&") if "=" in qs else ():
            name, eq, value = piece.partition("=")
            if eq and value and _is_secret_param(name):
                found.update({value, unquote_plus(value)})
    return found


# ---------------------------------------------------------------- secrets
def secrets_in(url_or_options: Any) -> set[str]:
    """The literal secret values in a URL, or in an options mapping.

    * a URL (a string with ``://``): the password; the username (with a
      password or alone, as in ``https://TOKEN@host``) when it has at least
      :data:`MIN_USERNAME_LEN` characters; the values of credential
      query/fragment parameters -- each as written and URL-decoded;
    * a mapping (``backend_options``, a ``models:`` entry, a whole pipeline
      config): the string value of every key that names a credential
      (``api_key: sk-...``), the key held by the environment variable named by
      ``api_key_env`` (or any ``*_env`` / ``*_ENV`` key naming a credential
      variable, e.g. ``token_env``), and the secrets of every URL value --
      recursively through nested mappings and lists.

    Values shorter than :data:`MIN_SECRET_LEN` and :data:`PLACEHOLDERS` are
    left out."""
    found: set[str] = set()

    def walk(obj: Any, key: str | None) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k))
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, key)
        elif isinstance(obj, str):
            if key is not None and _SECRET_KEY.search(key):
                found.add(obj)
            elif key is not None and re.search(r"[_-]env$", key, re.IGNORECASE) and _SECRET_KEY.search(key[:-4]):
                value = os.environ.get(obj)  # api_key_env: OPENAI_API_KEY -> the key itself
                if value:
                    found.add(value)
            if "://" in obj:
                found.update(_url_secrets(obj))

    walk(url_or_options, None)
    return {s for s in found if _is_secret_value(s)}


# ------------------------------------------------------------------- text
@functools.lru_cache(maxsize=1024)
def _forms(secret: str) -> tuple[str, ...]:
    """The ways ``secret`` may appear in text: as is, URL-encoded (both
    styles) and JSON-escaped."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret)}
    forms.add(json.dumps(secret)[1:-1])
    return tuple(sorted((f for f in forms if len(f) >= MIN_SECRET_LEN), key=len, reverse=True))


def _auth_sub(m: re.Match) -> str:
    """``Bearer X`` -> ``Bearer <redacted>`` always; ``Basic X`` only when X is
    base64 of ``user:password`` (so "Basic authentication failed" stays)."""
    scheme, space, token = m.group(1), m.group(2), m.group(3)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(token, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return m.group(0)
        if ":" not in decoded:
            return m.group(0)
    return f"{scheme}{space}{REDACTED}"


def redact_text(text: Any, secrets: Iterable[str] | None = None) -> Any:
    """``text`` with credentials replaced by ``<redacted>``:

    1. every occurrence of each secret value -- the registered ones and
       ``secrets`` -- as is, URL-encoded and JSON-escaped;
    2. every URL in the text through :func:`redact_url`, and credential
       parameters of relative URLs (``/v1/models?key=VALUE``);
    3. ``Bearer TOKEN`` / ``Basic B64`` and ``api_key=VALUE`` / ``"password": "VALUE"``
       / ``Authorization: VALUE`` style pairs.

    Non-strings are returned unchanged."""
    if not isinstance(text, str) or not text:
        return text
    values = registered_secrets()
    if secrets is not None:
        values.update(s for s in secrets if isinstance(s, str))
    forms: set[str] = set()
    for s in values:
        if _is_secret_value(s):
            forms.update(_forms(s))
    for f in sorted(forms, key=len, reverse=True):
        if f in text:
            text = text.replace(f, REDACTED)
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    if "=" in text:
        text = _QUERY_PAIR.sub(
            lambda m: f"{m.group('lead')}{m.group('name')}={REDACTED}" if _is_secret_param(m.group("name"))
            else m.group(0),
            text,
        )
    text = _AUTH_SCHEME.sub(_auth_sub, text)
    text = _PAIR.sub(lambda m: f"{m.group('name')}{m.group('sep')}{REDACTED}", text)
    return text


def redact_obj(obj: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings; other values kept)
    with the value of every key that names a credential replaced by
    ``<redacted>`` (as ``synthfb.engine.runner.scrub`` does) and every string
    passed through :func:`redact_text`. Dict keys are kept as they are."""
    values = None if secrets is None else [s for s in secrets if isinstance(s, str)]

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: (REDACTED if _SECRET_KEY.search(str(k)) else walk(v)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        if isinstance(o, str):
            return redact_text(o, values)
        return o

    return walk(obj)


# ---------------------------------------------------------------- logging
class RedactingFilter(logging.Filter):
    """A logging filter that formats each record's message, redacts it with
    :func:`redact_text` (registered secrets) and stores the result, so no
    handler sees the original. Add it to a logger (``logger.addFilter``) or to
    a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's problem, not ours
            return True
        record.msg = redact_text(msg)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger) -> None:
    """Add one :class:`RedactingFilter` to ``logger`` (idempotent)."""
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())


__all__ = [
    "MIN_SECRET_LEN",
    "MIN_USERNAME_LEN",
    "PLACEHOLDERS",
    "REDACTED",
    "RedactingFilter",
    "clear_registered_secrets",
    "install_log_redaction",
    "redact_obj",
    "redact_text",
    "redact_url",
    "register_secret",
    "register_secrets_in",
    "registered_secrets",
    "secrets_in",
]
