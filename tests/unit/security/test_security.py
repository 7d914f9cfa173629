"""Security defaults: no pickled weights without an explicit flag, safetensors checkpoints, secrets kept out
of saved configs, tracker hyperparameters and logs."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import RLHFConfig, validate
from rlhf.errors import ConfigError
from rlhf.models.loading import load_causal_lm
from rlhf.models.tiny import build_tiny_model
from rlhf.utils.redact import MASK, RedactingFilter, config_container, install_log_redaction, redact_text

SECRET = "sk-live-7f3a9c2e51"
ENV_SECRET = "wandb-key-0123456789abcdef"


@pytest.fixture(scope="module")
def pickled_checkpoint(tmp_path_factory) -> Path:
    """A tiny causal LM saved the old way: config.json + pytorch_model.bin (a pickle), no safetensors."""
    directory = tmp_path_factory.mktemp("pickled")
    model = build_tiny_model("qwen2", vocab_size=64, seed=0)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def test_trust_remote_code_is_off_and_safetensors_on_by_default():
    cfg = RLHFConfig()
    assert cfg.model.trust_remote_code is False and cfg.model.use_safetensors is True


def test_pickled_weights_need_the_flag(pickled_checkpoint):
    cfg = RLHFConfig()
    cfg.reward.model_path = str(pickled_checkpoint)
    with pytest.raises(ConfigError, match=r"reward.model_path=.* holds only pickled weights \(pytorch_model.bin\).*"
                       r"set model.use_safetensors=false"):  # fmt: skip
        validate(cfg)
    with pytest.raises(ConfigError, match="holds only pickled weights"):
        load_causal_lm(pickled_checkpoint, dtype="float32", use_safetensors=True)
    cfg.model.use_safetensors = False
    validate(cfg)  # the flag lets it through
    model = load_causal_lm(pickled_checkpoint, dtype="float32", use_safetensors=False)
    expected = torch.load(pickled_checkpoint / "pytorch_model.bin", weights_only=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])


def test_safetensors_checkpoints_pass(tmp_path):
    from rlhf.engines.train_engine import write_hf_checkpoint

    model = build_tiny_model("qwen2", vocab_size=64, seed=1)
    out = write_hf_checkpoint(tmp_path / "final", model.state_dict().items(), config=model.config)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    cfg = RLHFConfig()
    cfg.model.path = str(out)
    validate(cfg)
    reloaded = load_causal_lm(out, dtype="float32", use_safetensors=True)
    assert torch.equal(reloaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


def secret_config() -> RLHFConfig:
    cfg = RLHFConfig()
    cfg.reward.kwargs = {"api_key": SECRET, "max_new_tokens": 3, "token_env": "MY_TOKEN"}
    cfg.run.tracking.mlflow_tracking_uri = f"https://alice:{SECRET}@mlflow.example.com"
    cfg.reward.remote.url = f"http://127.0.0.1:8000/?token={SECRET}"
    cfg.extra = {"note": f"key is {ENV_SECRET}"}
    return cfg


def test_saved_config_has_no_secrets(tmp_path, monkeypatch):
    """The run's config.yaml, written by the real save path (fit_on_cluster), with the cluster stubbed out."""
    import rlhf.utils.ray_session
    from rlhf.trainers.runner import fit_on_cluster

    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    monkeypatch.setattr(rlhf.utils.ray_session, "ray_session", lambda cluster, **_: contextlib.nullcontext())

    class Done:
        def fit(self):
            return {}

        def close(self):
            pass

    fit_on_cluster(secret_config(), tmp_path, Done)
    text = (tmp_path / "config.yaml").read_text()
    assert SECRET not in text and ENV_SECRET not in text
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.reward.kwargs == {"api_key": MASK, "max_new_tokens": 3, "token_env": "MY_TOKEN"}
    assert saved.run.tracking.mlflow_tracking_uri == f"https://alice:{MASK}@mlflow.example.com"
    assert saved.reward.remote.url == f"http://127.0.0.1:8000/?token={MASK}"
    assert saved.reward.remote.token_env == "RLHF_REWARD_TOKEN"  # the variable's name is no secret
    # what trackers (W&B/MLflow) and step checkpoints receive is the same redacted tree
    assert SECRET not in str(config_container(secret_config()))


def test_log_records_are_redacted(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_log_redaction()
        log = logging.getLogger("rlhf.test_security")
        log.setLevel(logging.INFO)
        log.info("connecting with api_key=%s", SECRET)
        log.info("env token %s, header Authorization: Bearer %s", ENV_SECRET, SECRET)
        try:
            raise RuntimeError(f"server said: bad token {ENV_SECRET}")
        except RuntimeError:
            log.exception("request failed")
        log.info("kept: max_new_tokens=16, token_env=RLHF_REWARD_TOKEN")
    finally:
        root.removeHandler(handler)
        for target in (root, handler):
            for f in [f for f in target.filters if isinstance(f, RedactingFilter)]:
                target.removeFilter(f)
    out = stream.getvalue()
    assert SECRET not in out and ENV_SECRET not in out
    assert "api_key=***" in out and "Bearer ***" in out and "RuntimeError: server said: bad token ***" in out
    assert "max_new_tokens=16, token_env=RLHF_REWARD_TOKEN" in out


def test_redact_text_leaves_ordinary_text_alone():
    text = "pad token: <|end|>; loaded 12 tokens; tokenizer=/models/x; https://host:8080/path"
    assert redact_text(text, []) == text
