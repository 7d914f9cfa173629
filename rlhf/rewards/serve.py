"""An HTTP reward server: any reward function (registered name or "pkg.module:function") behind a bearer token.

    export RLHF_REWARD_TOKEN=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    python -m rlhf.rewards.serve --fn math --port 8000          # token from $RLHF_REWARD_TOKEN
    rlhf ... reward.remote.url=http://127.0.0.1:8000            # the run reads the same variable

Binds 127.0.0.1 unless --host says otherwise (put TLS in front before exposing it). Every
/score request must carry "Authorization: Bearer <token>" (401 otherwise) and a body of at most
--max-request-bytes (413 otherwise). A reward function that raises answers 500 with
{"error": "<ExceptionType>: <message>"}, which the client surfaces in its RewardError. The
protocol is in rlhf.rewards.remote. `--token` exists for tests and quick trials only: a
command-line token is visible to every user of the machine in the process list.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class, imported in create_app.
import argparse
import hmac
import json
import logging
import os
import sys
from typing import Any

from rlhf.errors import ConfigError, RLHFError
from rlhf.rewards.registry import RewardFn, load_reward_fn, score

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


def create_app(fn: RewardFn, *, token: str, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, name: str = "reward"):
    """A FastAPI app serving `fn` at POST /score (see rlhf.rewards.remote for the protocol)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.concurrency import run_in_threadpool
        from fastapi.responses import JSONResponse
    except ImportError as e:
        raise ConfigError("the reward server needs fastapi and uvicorn: pip install fastapi uvicorn") from e
    if not token:
        raise ConfigError("the reward server needs a non-empty bearer token")
    expected = f"Bearer {token}".encode()
    app = FastAPI(title=f"rlhf reward server ({name})", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, text: str) -> JSONResponse:
        return JSONResponse({"error": text}, status_code=status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/score")
    async def score_endpoint(request: Request):
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return error(401, "missing or wrong bearer token")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_request_bytes):
            return error(413, f"request body of {declared} bytes exceeds the limit of {max_request_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                return error(413, f"request body exceeds the limit of {max_request_bytes} bytes")
        try:
            payload = json.loads(body)
            prompts, responses, metadata = _fields(payload)
        except (ValueError, TypeError) as e:
            return error(422, f"bad request body: {e}")
        try:
            rewards = await run_in_threadpool(score, fn, prompts, responses, metadata, name=name)
        except Exception as e:  # the client shows this text in its RewardError
            logger.exception("reward function %s failed on %d rows", name, len(responses))
            return error(500, f"{type(e).__name__}: {e}")
        return {"rewards": rewards}

    return app


def _fields(payload: Any) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    if not isinstance(payload, dict):
        raise ValueError('expected a JSON object {"prompts": [...], "responses": [...], "metadata": [...]}')
    responses = payload.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError('"responses" must be a list of strings')
    prompts = payload.get("prompts", [""] * len(responses))
    metadata = payload.get("metadata", [{} for _ in responses])
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError('"prompts" must be a list of strings')
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError('"metadata" must be a list of objects')
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata rows differ")
    return prompts, responses, metadata


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf.rewards.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--fn", required=True, help='registered reward name or "pkg.module:function"')
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword hyperparameters for the function")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-env", default="RLHF_REWARD_TOKEN", help="environment variable holding the token")
    parser.add_argument("--token", default=None, help="the token itself (visible in the process list; tests only)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        token = args.token or os.environ.get(args.token_env, "")
        if not token:
            raise ConfigError(f"no token: export {args.token_env}=<secret> (or pass --token-env NAME)")
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        fn = load_reward_fn(args.fn, **kwargs)
        app = create_app(fn, token=token, max_request_bytes=args.max_request_bytes, name=args.fn)
    except (RLHFError, json.JSONDecodeError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 2
    import uvicorn

    logger.info("serving reward %s on http://%s:%d/score", args.fn, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
