"""The HTTP reward server and client over real loopback sockets (uvicorn in a thread, or the CLI in a subprocess).

Covers: correct scores across several batched requests, 401 without/with a wrong token, 413 for
too large a body, a server fn that raises (its text in our RewardError, no retry... on 4xx, retried
on 5xx), a slow fn (timeout, then retry succeeds; or RewardError after the retries).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from rlhf.config import RemoteRewardConfig
from rlhf.errors import ConfigError, RewardError
from rlhf.rewards.remote import RemoteRewardClient
from rlhf.rewards.serve import create_app

TOKEN = "test-token-123"


def length_fn(prompts, responses, metadata):
    """len(response) + metadata["bonus"], so scores prove the rows arrived intact and in order."""
    return [len(r) + float(m.get("bonus", 0)) for r, m in zip(responses, metadata)]


def failing_fn(prompts, responses, metadata):
    raise ValueError("reference answer missing for row 0")


class SlowOnce:
    """Sleeps past the client's timeout on the first call only; counts calls."""

    def __init__(self, sleep_s: float, times: int = 1):
        self.calls, self.sleep_s, self.times = 0, sleep_s, times

    def __call__(self, prompts, responses, metadata):
        self.calls += 1
        if self.calls <= self.times:
            time.sleep(self.sleep_s)
        return [1.0] * len(responses)


def serve(fn, **app_kwargs):
    """uvicorn on 127.0.0.1, an OS-chosen port, in a daemon thread; returns (url, stop)."""
    import uvicorn

    config = uvicorn.Config(create_app(fn, token=TOKEN, **app_kwargs), host="127.0.0.1", port=0, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture
def server_factory():
    stops = []

    def make(fn, **kwargs):
        url, stop = serve(fn, **kwargs)
        stops.append(stop)
        return url

    yield make
    for stop in stops:
        stop()


def client(url: str, token: str = TOKEN, **cfg) -> RemoteRewardClient:
    defaults = {"timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01}
    return RemoteRewardClient(RemoteRewardConfig(url=url, **{**defaults, **cfg}), token=token)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/score", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_scores_come_back_in_order_across_batched_requests(server_factory):
    url = server_factory(length_fn)
    responses = [f"r{'x' * i}" for i in range(7)]
    metadata = [{"bonus": 10 * i} for i in range(7)]
    c = client(url, batch_size=3, max_concurrency=2)  # requests of 3 + 3 + 1 rows
    c.health()
    assert c.score([""] * 7, responses, metadata) == [len(r) + 10 * i for i, r in enumerate(responses)]
    assert c.score([], [], []) == []


def test_requests_without_the_token_are_rejected(server_factory):
    url = server_factory(length_fn)
    body = json.dumps({"prompts": ["p"], "responses": ["r"], "metadata": [{}]}).encode()
    status, answer = post(url, body, {"Content-Type": "application/json"})
    assert status == 401 and answer == {"error": "missing or wrong bearer token"}
    status, _ = post(url, body, {"Authorization": "Bearer wrong"})
    assert status == 401
    status, answer = post(url, body, {"Authorization": f"Bearer {TOKEN}"})
    assert (status, answer) == (200, {"rewards": [1.0]})
    with pytest.raises(RewardError, match="rejected POST /score: HTTP 401: missing or wrong bearer token") as info:
        client(url, token="wrong").score(["p"], ["r"], [{}])
    assert "wrong" not in str(info.value).replace("missing or wrong", "")  # the token never shows


def test_too_large_a_request_is_rejected(server_factory):
    url = server_factory(length_fn, max_request_bytes=1000)
    assert client(url).score(["p"], ["short"], [{}]) == [5.0]
    with pytest.raises(RewardError, match=r"HTTP 413: request body of \d+ bytes exceeds the limit of 1000"):
        client(url).score(["p"], ["x" * 2000], [{}])


def test_server_errors_are_surfaced_after_the_retries(server_factory):
    url = server_factory(failing_fn)
    with pytest.raises(RewardError) as info:
        client(url, max_retries=1).score(["p"], ["r"], [{}])
    text = str(info.value)
    assert "failed after 2 attempt(s)" in text
    assert "HTTP 500: ValueError: reference answer missing for row 0" in text


def test_a_timeout_is_retried_with_backoff(server_factory):
    slow = SlowOnce(sleep_s=1.5)
    url = server_factory(slow)
    assert client(url, timeout_s=0.5, max_retries=2).score(["p", "q"], ["r", "s"], [{}, {}]) == [1.0, 1.0]
    assert slow.calls == 2  # the first request timed out, the retry answered


def test_a_server_that_never_answers_in_time_raises(server_factory):
    url = server_factory(SlowOnce(sleep_s=1.0, times=10))
    with pytest.raises(
        RewardError, match=r"failed after 2 attempt\(s\): no answer within reward.remote.timeout_s=0.3s"
    ):
        client(url, timeout_s=0.3, max_retries=1).score(["p"], ["r"], [{}])


def test_unreachable_server_and_missing_token():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RewardError, match=r"GET /health failed after 2 attempt\(s\): cannot connect"):
        client(f"http://127.0.0.1:{port}", max_retries=1).health()
    with pytest.raises(ConfigError, match="must start with http"):
        client("127.0.0.1:8000")


def test_serve_cli_binds_loopback_and_needs_a_token(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MY_REWARD_TOKEN": TOKEN}
    no_token = subprocess.run(
        [sys.executable, "-m", "rlhf.rewards.serve", "--fn", "exact_match", "--token-env", "UNSET_VAR_XYZ"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_token.returncode == 2 and "no token: export UNSET_VAR_XYZ" in no_token.stderr
    cmd = [sys.executable, "-m", "rlhf.rewards.serve", "--fn", "exact_match", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--token-env", "MY_REWARD_TOKEN"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        c = client(f"http://127.0.0.1:{port}", max_retries=8, backoff_s=0.5)
        c.health()  # retries while the server starts
        assert c.score(["q", "q"], ["7", "8"], [{"answer": "7"}, {"answer": "7"}]) == [1.0, 0.0]
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/score" in stderr and TOKEN not in stderr
