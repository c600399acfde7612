"""Engines of a loop: started on first use, at most one policy engine alive.

Each round's policy is a new checkpoint, and a vLLM engine cannot swap its
weights, so every round needs a new engine. :class:`LazyGenerator` knows its
model's identity (name, path, content revision) without starting anything, so
the runner can fingerprint a stage and reuse a finished one without paying an
engine start; the engine starts only when a stage really calls the model.
:class:`EnginePool` closes every other unpinned engine before starting a
policy engine, so the old policy is gone before the new one loads; the fixed
judges are pinned: they stay, and starting one closes nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from ..llm.types import Generator, UsageCounter


class LazyGenerator:
    """A :class:`~synthfb.llm.types.Generator` whose engine starts on the
    first ``generate``/``score`` call. ``info`` is the same as the engine's."""

    def __init__(self, backend: str, name: str, options: dict[str, Any],
                 before_start: Callable[["LazyGenerator"], None] | None = None, log: Callable[[str], None] | None = None):
        from ..llm import local_model_info

        self.backend = backend
        self.options = dict(options)
        self.info = local_model_info(backend, name)
        self._idle = UsageCounter()
        self._gen: Generator | None = None
        self._before_start = before_start
        self._log = log or (lambda msg: None)

    @property
    def started(self) -> bool:
        return self._gen is not None

    @property
    def usage(self) -> UsageCounter:
        return self._gen.usage if self._gen is not None else self._idle

    def engine(self) -> Generator:
        """The running engine (started now if needed)."""
        if self._gen is None:
            from ..llm import load_generator

            if self._before_start:
                self._before_start(self)
            self._log(f"starting {self.backend} engine for {self.info.name}")
            self._gen = load_generator(self.backend, self.info.name, **self.options)
        return self._gen

    def generate(self, requests, desc: str = ""):
        return self.engine().generate(requests, desc=desc)

    def score(self, requests):
        return self.engine().score(requests)

    def close(self) -> None:
        if self._gen is not None:
            self._log(f"closing engine for {self.info.name}")
            gen, self._gen = self._gen, None
            gen.close()


class EnginePool:
    """Engines by model name: caller-given ones (never closed here) and lazy
    ones (closed by :meth:`close`). Before an unpinned (policy) engine
    starts, every other started unpinned engine is closed; pinned ones (the
    judges) are never closed before :meth:`close`."""

    def __init__(self, backend: str, backend_options: dict[str, Any], models: dict[str, dict[str, Any]], seed: int,
                 *, given: dict[str, Generator] | None = None, progress: bool = True, out: Any = None):
        self.out = out  # where progress lines go (the loop console's terminal); None: stderr
        self.backend = backend
        self.backend_options = dict(backend_options)
        self.models = dict(models)
        self.seed = seed
        self.progress = progress
        self.given = dict(given or {})
        self.lazy: dict[str, LazyGenerator] = {}
        self.pinned: set[str] = set()

    def _log(self, msg: str) -> None:
        if self.progress:
            print(f"synthfb loop: {msg}", file=self.out or sys.stderr, flush=True)

    def options(self, name: str) -> dict[str, Any]:
        """Backend options for ``name``, as the pipeline runner computes them."""
        from ..llm import engine_options

        return engine_options(self.backend, self.backend_options, self.models, name, self.seed, self.progress)

    def get(self, name: str) -> Generator:
        if name in self.given:
            return self.given[name]
        if name not in self.lazy:
            self.lazy[name] = LazyGenerator(self.backend, name, self.options(name), self._make_room, self._log)
        return self.lazy[name]

    def pin(self, *names: str) -> None:
        """Keep these engines alive when others start (the fixed judges)."""
        self.pinned.update(names)

    def _make_room(self, starting: LazyGenerator) -> None:
        if starting.info.name in self.pinned:  # a judge starting late must not evict the live policy
            return
        for name, gen in self.lazy.items():
            if gen is not starting and gen.started and name not in self.pinned:
                gen.close()

    def release(self, name: str) -> None:
        """Close ``name``'s engine now unless it is pinned or caller-given."""
        gen = self.lazy.get(name)
        if gen is not None and name not in self.pinned:
            gen.close()

    def close(self) -> None:
        for gen in self.lazy.values():
            gen.close()
        self.lazy.clear()
