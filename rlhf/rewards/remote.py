"""Client of an HTTP reward server (`python -m rlhf.rewards.serve`, or any server speaking its protocol).

Protocol: POST {url}/score with header "Authorization: Bearer <token>" and JSON body
{"prompts": [...], "responses": [...], "metadata": [{...}, ...]}; the answer is
{"rewards": [float, ...]}, one per response. Errors answer {"error": "<text>"} with a 4xx/5xx
status. GET {url}/health answers {"status": "ok"} without authentication.

The client splits a batch into `batch_size` rows per request, keeps up to `max_concurrency`
requests in flight, and retries a request after a timeout, a connection error or a 5xx status,
waiting backoff_s × 2^k before retry k. A 4xx is the caller's fault and is not retried. When a
request still fails, `score` raises RewardError carrying the server's error text: a failed
reward is never silently scored 0. The token is read from an environment variable, kept out of
repr() and never logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rlhf.config import RemoteRewardConfig
from rlhf.errors import ConfigError, RewardError

logger = logging.getLogger(__name__)


class _Retryable(Exception):
    """One attempt failed in a way worth retrying."""


class RemoteRewardClient:
    def __init__(self, cfg: RemoteRewardConfig, *, token: str | None = None):
        if not cfg.url or not cfg.url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.remote.url {cfg.url!r} must start with http:// or https://")
        if token is None:
            token = os.environ.get(cfg.token_env, "")
            if not token:
                raise ConfigError(
                    f"reward.remote needs a bearer token in the environment variable {cfg.token_env!r} "
                    "(reward.remote.token_env names it); export it before starting the run"
                )
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self._token = token

    def __repr__(self) -> str:
        return f"RemoteRewardClient(url={self.url!r}, token=<from ${self.cfg.token_env}>)"

    def health(self) -> None:
        """RewardError unless GET /health answers within the timeout (with the configured retries)."""
        self._with_retries(lambda: self._request("GET", "/health", None), what="GET /health")

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        """One reward per response, from requests of at most batch_size rows."""
        size = self.cfg.batch_size
        chunks = [
            (prompts[i : i + size], responses[i : i + size], metadata[i : i + size])
            for i in range(0, len(responses), size)
        ]
        if not chunks:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, len(chunks))) as pool:
            parts = list(pool.map(lambda chunk: self._score_chunk(*chunk), chunks))
        return [r for part in parts for r in part]

    def _score_chunk(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        body = json.dumps({"prompts": prompts, "responses": responses, "metadata": metadata}, default=str).encode()
        answer = self._with_retries(
            lambda: self._request("POST", "/score", body), what=f"POST /score ({len(responses)} rows)"
        )
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list) or len(rewards) != len(responses):
            raise RewardError(
                f"reward server {self.url} answered {str(answer)[:300]!r}; expected {{'rewards': [...]}} with "
                f"{len(responses)} floats"
            )
        try:
            values = [float(r) for r in rewards]
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward server {self.url} returned non-numeric rewards: {e}") from e
        if not all(math.isfinite(v) for v in values):
            raise RewardError(f"reward server {self.url} returned non-finite rewards {values[:5]}")
        return values

    def _with_retries(self, attempt, *, what: str) -> Any:
        retries = self.cfg.max_retries
        for k in range(retries + 1):
            try:
                return attempt()
            except _Retryable as e:
                if k == retries:
                    raise RewardError(
                        f"reward server {self.url}: {what} failed after {retries + 1} attempt(s): {e}"
                    ) from None
                delay = self.cfg.backoff_s * 2**k
                logger.warning(
                    "reward server %s: %s failed (%s); retry %d/%d in %.1fs", self.url, what, e, k + 1, retries, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _request(self, method: str, path: str, body: bytes | None) -> Any:
        headers = {"Content-Type": "application/json"}
        if path != "/health":
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            text = _error_text(e)
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {text}") from None
            raise RewardError(f"reward server {self.url} rejected {method} {path}: HTTP {e.code}: {text}") from None
        except TimeoutError as e:
            raise _Retryable(f"no answer within reward.remote.timeout_s={self.cfg.timeout_s}s ({e})") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Retryable(f"no answer within reward.remote.timeout_s={self.cfg.timeout_s}s") from None
            raise _Retryable(f"cannot connect: {e.reason}") from None
        except (ConnectionError, json.JSONDecodeError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None


def _error_text(error: urllib.error.HTTPError) -> str:
    """The server's {"error": ...} text, or its raw body."""
    try:
        raw = error.read().decode(errors="replace")
    except Exception:  # the body may be gone with the connection
        return error.reason or ""
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError:
        return raw[:2000]
    if isinstance(payload, dict):
        return str(payload.get("error") or payload.get("detail") or payload)[:2000]
    return raw[:2000]
