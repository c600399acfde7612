"""Generator backend for any OpenAI-compatible HTTP server (``vllm serve``,
OpenAI, and the like).

Requests run concurrently (asyncio + ``httpx.AsyncClient``, bounded by a
semaphore) and are retried with ``tenacity`` on transient failures. A request
that still fails comes back with ``GenerationResult.error`` set instead of
raising, so one bad request never sinks a chunk.

vLLM extensions (used only when the server is vLLM, detected from
``owned_by == "vllm"`` in ``/v1/models``, or forced with ``vllm_extensions``):

* ``return_token_ids`` gives the exact token count of every choice;
* ``structured_outputs: {"json": schema}`` constrains ``/v1/completions``
  (chat requests always use the standard ``response_format`` json_schema);
* ``score()`` uses ``/tokenize`` (at the server root) and ``prompt_logprobs``.

Per-choice token counts on other servers: with ``n == 1`` the choice gets
``usage.completion_tokens``; with ``n > 1`` and only a total, the total is
split over the choices in proportion to their text length (largest remainder,
so the counts sum to the total). Such counts are estimates.

The API key is read from the environment variable named by ``api_key_env``
each time a client is built; it is never stored on the object.

Credentials never leave this module in anything it reports: ``base_url`` may
carry them (``http://user:pass@host/v1``, ``...?api-key=KEY``; the requests
use them as given: userinfo as HTTP basic auth, the query on every request),
but ``self.base_url``, ``self.info.path``, ``repr()``, log records, exception
messages and ``GenerationResult.error`` show the URL through
:func:`synthfb.data.redact.redact_url`, and every text taken from a server
(error bodies may echo the key or the request URL) goes through
:func:`~synthfb.data.redact.redact_text`. The key and the URL's secrets are
registered with :mod:`synthfb.data.redact`, so whoever writes this module's
messages to disk (the runner) redacts them too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import logging
import math
import os
import random
import time
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from ..data.redact import install_log_redaction, redact_text, redact_url, register_secret, register_secrets_in
from .base import make_completion
from .types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    ScoreRequest,
    ScoreResult,
    UsageCounter,
)

logger = logging.getLogger(__name__)
install_log_redaction(logger)  # records of this module never show a registered secret

T = TypeVar("T")

_EXCERPT = 300  # characters of a server error body quoted in messages


class _StatusError(Exception):
    """The server answered with an HTTP error status."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        message = redact_text(message)
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status in (408, 429) or self.status >= 500


class _BadResponse(Exception):
    """A 2xx answer whose body is not the JSON we expect (e.g. truncated)."""


class _RequestFailed(Exception):
    """A request failed for good; the message is the user-facing error."""


class _NotFound(Exception):
    """404/405 on an endpoint: the server does not offer it."""

    def __init__(self, url: str, status: int, message: str) -> None:
        url, message = redact_url(url), redact_text(message)
        super().__init__(f"HTTP {status} on {url}: {message}")
        self.url = url
        self.status = status


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, _StatusError):
        return exc.retryable
    if isinstance(exc, _BadResponse):
        return True
    # connect/read/write errors, dropped connections, incomplete bodies, timeouts
    return isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError))


def _describe(exc: BaseException) -> str:
    """One line on a failed try, with credentials redacted."""
    if isinstance(exc, (_StatusError, _NotFound)):
        text = str(exc)
    elif isinstance(exc, _BadResponse):
        text = f"invalid response body: {exc}"
    elif isinstance(exc, httpx.TimeoutException):
        text = f"timeout ({type(exc).__name__}){': ' + str(exc) if str(exc) else ''}"
    else:
        text = f"{type(exc).__name__}: {str(exc) or '(no detail)'}"
    return redact_text(text)


def _redacted(exc: BaseException) -> BaseException:
    """``exc`` itself if its message shows no credential, else an exception of
    the same type (or RuntimeError) with the redacted message."""
    text = str(exc)
    clean = redact_text(text)
    if clean == text:
        return exc
    try:
        return type(exc)(clean)
    except Exception:  # noqa: BLE001 - a constructor with other arguments
        return RuntimeError(f"{type(exc).__name__}: {clean}")


def _error_message(resp: httpx.Response) -> str:
    """The server's error message (OpenAI ``{"error": {"message"}}``,
    FastAPI ``{"detail"}``) or an excerpt of the raw body."""
    text = resp.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    msg: Any = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):
            msg = err
        msg = msg or body.get("detail") or body.get("message")
    if msg is None:
        msg = text
    if not isinstance(msg, str):
        msg = json.dumps(msg)
    # redacted before it is cut, so no part of a secret survives at the cut
    msg = redact_text(" ".join(msg.split()))
    return (msg[:_EXCERPT] + "...") if len(msg) > _EXCERPT else (msg or "(empty body)")


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _split_tokens(total: int, texts: list[str]) -> list[int]:
    """Split a total token count over choices in proportion to text length
    (largest remainder); the parts sum to ``total``."""
    if not texts:
        return []
    weights = [max(len(t), 1) for t in texts]
    wsum = sum(weights)
    raw = [total * w / wsum for w in weights]
    parts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


class OpenAIGenerator:
    """A :class:`~synthfb.llm.types.Generator` that talks to an
    OpenAI-compatible server over HTTP.

    Args:
        model: model id as the server knows it (``vllm serve`` uses the path
            or ``--served-model-name``).
        base_url: API root including ``/v1``.
        api_key_env: name of the environment variable holding the API key
            (sent as ``Authorization: Bearer``; none is sent if it is unset).
        concurrency: most requests in flight at once.
        timeout: seconds per HTTP attempt.
        max_retries: tries per request in all, the first included (a request
            that keeps failing reports "failed after ``max_retries`` tries").
        retry_wait_max: cap in seconds on one backoff wait, ``Retry-After``
            included.
        retry_wait_min: first backoff wait; it doubles per try, plus up to as
            much again of random jitter.
        vllm_extensions: use vLLM-only request fields; ``None`` detects vLLM
            from ``/v1/models``.
    """

    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 5,
        retry_wait_max: float = 30.0,
        retry_wait_min: float = 0.5,
        vllm_extensions: bool | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1 (tries in all), got {max_retries}")
        self.model = model
        register_secrets_in(base_url)
        parts = urlsplit(base_url.strip())
        path = parts.path.rstrip("/")
        root = path[: -len("/v1")] if path.endswith("/v1") else path  # vLLM's /tokenize lives here, not under /v1
        # what requests use: the URL as given (userinfo -> basic auth; the query goes on every request)
        self._endpoint = (parts.scheme, parts.netloc, path, root, parts.query)
        self.base_url = self._shown("")  # for display: credentials redacted
        self.root_url = self._shown("", root=True)
        self.api_key_env = api_key_env
        self._headers()  # registers the key (not stored here)
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_wait_max = retry_wait_max
        self.retry_wait_min = retry_wait_min
        self._vllm_forced = vllm_extensions
        self.is_vllm = bool(vllm_extensions)
        self._probed = False
        self._closed = False
        self.usage = UsageCounter()
        self.info = ModelInfo(name=model, path=self.base_url, revision="unknown", backend="openai")
        self._probe()

    # ------------------------------------------------------------------ setup
    def _url(self, suffix: str, root: bool = False) -> str:
        """The request URL of endpoint ``suffix`` (e.g. ``/models``) under the
        API root (or the server root), credentials included."""
        scheme, netloc, path, root_path, query = self._endpoint
        return urlunsplit((scheme, netloc, (root_path if root else path) + suffix, query, ""))

    def _shown(self, suffix: str, root: bool = False) -> str:
        """The URL of ``suffix`` for messages: credentials redacted."""
        return redact_url(self._url(suffix, root))

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            register_secret(key)
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _probe(self) -> None:
        """Read ``/v1/models`` once (best effort): revision and vLLM detection.
        A server that is not up yet is probed again on the first call."""
        try:
            with httpx.Client(timeout=min(self.timeout, 10.0), headers=self._headers()) as client:
                resp = client.get(self._url("/models"))
            if resp.status_code != 200:
                logger.warning("GET %s: HTTP %d: %s", self._shown("/models"), resp.status_code, _error_message(resp))
                self._probed = True  # reachable; the endpoint is just not there
                return
            data = resp.json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            logger.warning("could not read %s (%s); will try again on first use", self._shown("/models"), _describe(e))
            return
        self._probed = True
        cards = [c for c in data if isinstance(c, dict)]
        card = next((c for c in cards if c.get("id") == self.model), None)
        if card is None and cards:
            logger.warning(
                "model %r is not among the server's models %s", self.model, [c.get("id") for c in cards]
            )
        revision = str((card or {}).get("revision") or "unknown")
        if self._vllm_forced is None:
            self.is_vllm = any(c.get("owned_by") == "vllm" for c in cards)
        self.info = ModelInfo(name=self.model, path=self.base_url, revision=revision, backend="openai")

    # ------------------------------------------------------------- plumbing
    def _run(self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine from sync code; in a worker thread if this thread
        already runs an event loop."""
        if self._closed:
            raise RuntimeError("OpenAIGenerator is closed")
        if not self._probed:
            self._probe()
        try:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run(factory())
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                return pool.submit(lambda: asyncio.run(factory())).result()
        except Exception as e:
            clean = _redacted(e)
            if clean is e:
                raise
            raise clean from None  # the original (and its chain) would show the credential

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            headers=self._headers(),
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 30.0)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _StatusError) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry_wait_max)
        # exponential backoff with jitter: min * 2**(try-1) + U(0, min), capped
        base = self.retry_wait_min * 2 ** (state.attempt_number - 1)
        return min(self.retry_wait_max, base + random.uniform(0, self.retry_wait_min))

    def _before_sleep(self, label: str) -> Callable[[RetryCallState], None]:
        def hook(state: RetryCallState) -> None:
            self.usage.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.warning(
                "%s: try %d/%d failed (%s); retrying in %.2f s",
                label, state.attempt_number, self.max_retries, _describe(exc) if exc else "?", wait,
            )

        return hook

    async def _with_retries(self, label: str, attempt: Callable[[], Awaitable[T]]) -> tuple[T, int]:
        """Run ``attempt`` with retries; returns (result, tries). On final
        failure raises ``_RequestFailed`` whose message names ``label``, the
        number of tries and the cause; ``NotImplementedError`` and
        ``_NotFound`` (404/405) pass through unchanged."""
        tries = 0

        async def counted() -> T:
            nonlocal tries
            tries += 1
            return await attempt()

        try:
            async for retrying in AsyncRetrying(
                stop=stop_after_attempt(self.max_retries),
                wait=self._wait,
                retry=retry_if_exception(_is_retryable),
                before_sleep=self._before_sleep(label),
                reraise=True,
            ):
                with retrying:
                    result = await counted()
            return result, tries  # type: ignore[possibly-undefined]
        except (NotImplementedError, _NotFound):
            raise
        except Exception as e:
            if _is_retryable(e):
                raise _RequestFailed(f"{label} failed after {tries} tries: {_describe(e)}") from e
            raise _RequestFailed(f"{label} failed (not retried): {_describe(e)}") from e

    async def _post(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, url: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """One POST; raises the exceptions ``_is_retryable`` sorts."""
        async with sem:
            # reads the whole body; a cut-off body or dropped connection raises here
            resp = await client.post(url, json=body)
        if resp.status_code in (404, 405):
            raise _NotFound(redact_url(url), resp.status_code, _error_message(resp))
        if resp.status_code >= 400:
            raise _StatusError(resp.status_code, _error_message(resp), _retry_after(resp))
        try:
            data = json.loads(resp.content)
        except ValueError as e:
            excerpt = redact_text(resp.text)[:80].replace("\n", " ")
            raise _BadResponse(f"not JSON ({e}); body starts {excerpt!r}") from e
        if not isinstance(data, dict):
            raise _BadResponse(f"expected a JSON object, got {type(data).__name__}")
        return data

    # ------------------------------------------------------------- generate
    def _body(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        p = req.params
        body: dict[str, Any] = {
            "model": self.model,
            "n": p.n,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
        }
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if self.is_vllm:
            body["return_token_ids"] = True
        if req.messages is not None:
            body["messages"] = req.messages
            if req.json_schema is not None:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": req.json_schema},
                }
            return self._url("/chat/completions"), body
        body["prompt"] = req.prompt
        if req.json_schema is not None:
            if self.is_vllm:
                body["structured_outputs"] = {"json": req.json_schema}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": req.json_schema},
                }
        return self._url("/completions"), body

    @staticmethod
    def _parse(data: dict[str, Any], chat: bool, schema: dict | None) -> tuple[list[Completion], int, int]:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _BadResponse("no 'choices' in the response")
        try:
            choices = sorted(choices, key=lambda c: c.get("index", 0))
            if chat:
                texts = [((c.get("message") or {}).get("content") or "") for c in choices]
            else:
                texts = [c.get("text") or "" for c in choices]
        except (AttributeError, TypeError) as e:
            raise _BadResponse(f"malformed 'choices': {e}") from e
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        total = usage.get("completion_tokens")
        ids = [c.get("token_ids") for c in choices]
        if all(isinstance(x, list) for x in ids):
            counts = [len(x) for x in ids]
        elif total is not None:
            counts = _split_tokens(int(total), texts)
        else:
            counts = [0] * len(texts)
        completions = [
            make_completion(t, c.get("finish_reason"), k, schema) for t, c, k in zip(texts, choices, counts)
        ]
        completion_tokens = int(total) if total is not None else sum(counts)
        return completions, prompt_tokens, completion_tokens

    async def _generate_one(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, i: int, req: GenerationRequest
    ) -> GenerationResult:
        url, body = self._body(req)
        chat = req.messages is not None
        self.usage.requests += 1

        async def attempt() -> tuple[list[Completion], int, int]:
            data = await self._post(client, sem, url, body)
            return self._parse(data, chat, req.json_schema)

        try:
            (completions, prompt_tokens, completion_tokens), _ = await self._with_retries(f"request {i}", attempt)
        except _RequestFailed as e:
            self.usage.failures += 1
            return GenerationResult(completions=[], error=redact_text(str(e)))
        except _NotFound as e:
            self.usage.failures += 1
            return GenerationResult(completions=[], error=redact_text(f"request {i} failed (not retried): {e}"))
        self.usage.prompt_tokens += prompt_tokens
        self.usage.completion_tokens += completion_tokens
        return GenerationResult(completions=completions, prompt_tokens=prompt_tokens)

    def generate(self, requests: list[GenerationRequest], desc: str = "") -> list[GenerationResult]:
        """All requests concurrently; one result per request, in order.
        Failed requests have ``error`` set (this does not raise for them)."""
        requests = list(requests)
        if not requests:
            return []

        async def main() -> list[GenerationResult]:
            sem = asyncio.Semaphore(self.concurrency)
            async with self._client() as client:
                return list(
                    await asyncio.gather(*(self._generate_one(client, sem, i, r) for i, r in enumerate(requests)))
                )

        t0 = time.monotonic()
        results = self._run(main)
        failed = sum(r.error is not None for r in results)
        logger.info(
            "%s%d requests in %.1f s (%d failed); usage %s",
            f"{desc}: " if desc else "", len(results), time.monotonic() - t0, failed, self.usage.snapshot(),
        )
        return results

    # ---------------------------------------------------------------- score
    async def _tokenize(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, label: str, body: dict[str, Any]
    ) -> list[int]:
        url = self._url("/tokenize", root=True)

        async def attempt() -> list[int]:
            data = await self._post(client, sem, url, {"model": self.model, **body})
            tokens = data.get("tokens")
            if not isinstance(tokens, list):
                raise _BadResponse("no 'tokens' list in the /tokenize response")
            return [int(t) for t in tokens]

        return (await self._with_retries(label, attempt))[0]

    async def _score_one(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, i: int, req: ScoreRequest
    ) -> ScoreResult:
        label = f"score request {i}"
        if req.messages is not None:
            ctx = await self._tokenize(client, sem, label, {"messages": req.messages, "add_generation_prompt": True})
        else:
            ctx = await self._tokenize(client, sem, label, {"prompt": req.prompt, "add_special_tokens": True})
        cont = await self._tokenize(client, sem, label, {"prompt": req.continuation, "add_special_tokens": False})
        if not cont:
            return ScoreResult(logprob=0.0, token_logprobs=[])
        if not ctx:
            raise ValueError(f"{label}: the context is empty, so the first continuation token has no logprob")
        ids = ctx + cont
        body = {
            "model": self.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }
        self.usage.requests += 1

        async def attempt() -> list[float]:
            data = await self._post(client, sem, self._url("/completions"), body)
            choices = data.get("choices")
            if not isinstance(choices, list) or not choices:
                raise _BadResponse("no 'choices' in the response")
            plp = choices[0].get("prompt_logprobs")
            if plp is None:
                plp = data.get("prompt_logprobs")
            if plp is None:
                raise NotImplementedError(
                    f"{self._shown('/completions')} returned no 'prompt_logprobs'; score() needs a vLLM server"
                )
            if len(plp) != len(ids):
                raise _BadResponse(f"prompt_logprobs has {len(plp)} entries for {len(ids)} prompt tokens")
            out = []
            for pos in range(len(ctx), len(ids)):
                entry = plp[pos] or {}
                hit = entry.get(str(ids[pos]))
                if not isinstance(hit, dict) or "logprob" not in hit:
                    raise _BadResponse(f"prompt_logprobs[{pos}] lacks token {ids[pos]}")
                out.append(float(hit["logprob"]))
            usage = data.get("usage") or {}
            self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
            return out

        token_logprobs = (await self._with_retries(label, attempt))[0]
        return ScoreResult(logprob=float(sum(token_logprobs)), token_logprobs=token_logprobs)

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Log-probabilities of each continuation given its context (vLLM
        servers only: uses ``/tokenize`` and ``prompt_logprobs``).

        Raises ``NotImplementedError`` if the server lacks those, and
        ``RuntimeError`` naming the request if one fails for good.
        """
        requests = list(requests)
        if not requests:
            return []

        async def main() -> list[Any]:
            sem = asyncio.Semaphore(self.concurrency)
            async with self._client() as client:
                return list(
                    await asyncio.gather(
                        *(self._score_one(client, sem, i, r) for i, r in enumerate(requests)),
                        return_exceptions=True,
                    )
                )

        results = self._run(main)
        errors = [r for r in results if isinstance(r, BaseException)]
        self.usage.failures += len(errors)
        for e in errors:
            if isinstance(e, (NotImplementedError, _NotFound)):
                raise NotImplementedError(redact_text(
                    f"score() needs vLLM's /tokenize endpoint and prompt_logprobs on /v1/completions; "
                    f"the server at {self.base_url} does not provide them ({e})"
                )) from _redacted(e)
        if errors:
            e = errors[0]
            raise RuntimeError(
                redact_text(f"{len(errors)} of {len(requests)} score requests failed; first: {e}")
            ) from _redacted(e)
        return results

    def close(self) -> None:
        """Nothing persistent to release (clients live per call); later calls raise."""
        self._closed = True

    def __repr__(self) -> str:
        return f"OpenAIGenerator(model={self.model!r}, base_url={self.base_url!r})"

