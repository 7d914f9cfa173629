"""Keep secrets out of everything a run writes: saved configs, tracker hyperparameters and log lines.

One rule, applied everywhere (`redact`, `redact_text`, `RedactingFilter`):
  - a mapping value whose key names a secret (token, api_key, secret, password, credential,
    authorization; see `is_secret_key`) is replaced by MASK when it is a non-empty string;
    keys ending in "_env" name an environment variable, not a secret, and are kept, as are
    counts such as max_new_tokens (not strings);
  - in any string: the password of a URL ("https://user:pw@host"), the value of a secret-named
    query parameter or `key=value` / `key: value` pair, a "Bearer <token>" header, and the
    value of any secret environment variable (`secret_env_values`: WANDB_API_KEY, HF_TOKEN,
    RLHF_REWARD_TOKEN, and every variable whose name looks secret) are masked.

Configs never need secrets (the remote reward reads its token from reward.remote.token_env;
W&B and MLflow read theirs from the environment), so masking only removes what a user pasted
by mistake, e.g. into reward.kwargs or a URL.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"
MIN_SECRET_LENGTH = 6
"""Environment values shorter than this are not searched for in text (masking "1" would mangle every number)."""
SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RLHF_REWARD_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "OPENAI_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
)
"""Always treated as secret; any other variable whose name `is_secret_key` flags is too."""

_SECRET_WORDS = r"(?:token(?!s|iz)|api[_-]?key|apikey|secret|passw(?:or)?d|credential|authorization|private[_-]?key)"
_SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+:)(?P<secret>[^/\s@]+)(?=@)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<head>\bbearer\s+)(?P<secret>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)
_PAIR = re.compile(
    r"(?P<head>(?P<key>[\w-]*"
    + _SECRET_WORDS
    + r"[\w-]*)(?P<sep>['\"]?\s*[=:]\s*['\"]?))(?!bearer\s)(?P<secret>[^\s'\",&;}{]+)",
    re.IGNORECASE,
)


def is_secret_key(name: str) -> bool:
    """True for a field or variable name that holds a secret (api_key, hf_token, DB_PASSWORD, ...).

    Names of environment variables ("token_env") hold no secret and are not flagged.
    """
    return bool(_SECRET_KEY.search(name)) and not name.lower().endswith("_env")


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret environment variables, longest first (so a longer secret is masked whole)."""
    environ = os.environ if environ is None else environ
    values = {
        value
        for name, value in environ.items()
        if (name in SECRET_ENV_VARS or is_secret_key(name)) and len(value) >= MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with URL passwords, bearer tokens, secret key=value pairs and secret env values masked."""
    for value in secret_env_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    text = _BEARER.sub(lambda m: m["head"] + MASK, text)
    return _PAIR.sub(_mask_pair, text)


def _mask_pair(match: re.Match) -> str:
    key = match["key"].lower()
    if key.endswith("_env") or (key == "token" and ":" in match["sep"]):  # a variable's name; prose ("pad token: x")
        return match[0]
    return match["head"] + MASK


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a plain config tree (dicts, lists, scalars) with every secret masked (see module docstring)."""
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {
            key: MASK
            if isinstance(key, str) and is_secret_key(key) and isinstance(item, str) and item
            else redact(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item, secrets) for item in value)
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def config_container(cfg: Any) -> dict[str, Any]:
    """The run config (dataclass or DictConfig) as a plain dict with secrets masked: what we save or log."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return redact(OmegaConf.to_container(node, resolve=True))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the redacted config as YAML to `path` (the run's config.yaml)."""
    from omegaconf import OmegaConf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config_container(cfg)), path)
    return path


def redact_yaml_file(path: str | Path) -> None:
    """Rewrite a YAML file (e.g. Hydra's .hydra/config.yaml or overrides.yaml) with its secrets masked."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        return
    original = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    cleaned = redact(original)
    if cleaned != original:
        OmegaConf.save(OmegaConf.create(cleaned), path)


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's rendered message and traceback (installed on handlers by the CLI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_env_values()
        message = record.getMessage()
        cleaned = redact_text(message, secrets)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, secrets)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add one RedactingFilter to `logger` (default: root) and each of its handlers; idempotent."""
    logger = logger or logging.getLogger()
    existing = next((f for f in logger.filters if isinstance(f, RedactingFilter)), None)
    redacting = existing or RedactingFilter()
    for target in [logger, *logger.handlers]:
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(redacting)
    return redacting
