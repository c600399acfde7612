"""Live progress from inside an engine call.

The runner sets a hook with :func:`report_to` around a chunk; a backend that
can tell when each request finishes (vLLM) calls :func:`requests_done` as they
do, so the terminal's progress line moves within a long chunk instead of
jumping at its end. Without a hook nothing is reported.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

# hook(requests_finished_since_last_call, requests_in_this_engine_call, completion_tokens_per_s or None)
Hook = Callable[[int, int, "float | None"], None]
_HOOK: contextvars.ContextVar[Hook | None] = contextvars.ContextVar("synthfb_live_hook", default=None)


@contextlib.contextmanager
def report_to(hook: Hook | None) -> Iterator[None]:
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def current() -> Hook | None:
    return _HOOK.get()
