"""Reward-model training: DeepSpeed ranks of AutoModelForSequenceClassification(num_labels=1).

The backbone comes from a causal-LM (or reward-model) checkpoint; a missing `score` head starts
fresh, identically on every rank (seeded before loading). Pairs are scored at their last real
token exactly as rlhf.workers.reward.RewardWorker scores, and `save_hf` writes a plain
sequence-classification checkpoint with its tokenizer, so `reward.model_path=<output>/final`
works in the RL stages.

model.peft.method applies (rlhf.models.peft_utils.SCALAR_HEAD_PEFT_METHODS: lora, ia3, loha, lokr
on the transformer, bitfit, freeze) and the `score` head always trains in full. `save_hf` writes
the merged weights, plus peft's adapter (with the head) in `adapter/` for the adapter methods.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf.engines.adapters import ADAPTER_DIR, has_adapter, save_adapter
from rlhf.models.loading import load_sequence_scorer, load_tokenizer, resolve_model_path
from rlhf.models.peft_methods import check_scalar_head_peft
from rlhf.models.peft_utils import apply_peft, plain_module
from rlhf.workers.group import dispatch
from rlhf.workers.offline_policy import OfflineTrainableWorker

logger = logging.getLogger(__name__)


class RewardModelWorker(OfflineTrainableWorker):
    """One data-parallel rank of a reward model in training (objective `reward`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        """Arguments: OfflineTrainableWorker's."""
        super().__init__(*args, **kwargs)
        check_scalar_head_peft(self.model_cfg, "reward model")
        self.tokenizer: Any = None
        self.hf_config: Any = None

    def _forward_model(self) -> Any:
        # last_token_scores reaches into the backbone and the head, so it needs the HF module itself
        # (inside a PeftModel: the base model, whose layers peft has wrapped in place)
        return plain_module(self._require_engine().module)

    def _load_model(self, model_path: str) -> Any:
        """Backbone (and head, if the checkpoint has one) from `model_path`, with its tokenizer."""
        path = resolve_model_path(model_path)
        self.tokenizer = load_tokenizer(path, trust_remote_code=self.model_cfg.trust_remote_code)
        model = load_sequence_scorer(
            path,
            dtype=self.dtype,
            trust_remote_code=self.model_cfg.trust_remote_code,
            use_safetensors=self.model_cfg.use_safetensors,
            zero3_config=self._zero3_config(),
        )
        model.config.pad_token_id = self.tokenizer.pad_token_id
        model.config.architectures = [type(model).__name__]
        model.config.use_cache = False
        self.hf_config = model.config
        return model

    def _apply_peft(self, model: Any) -> Any:
        return apply_peft(model, self.model_cfg, task_type="SEQ_CLS", head="score")

    @dispatch("broadcast", collect="first")
    def save_hf(self, directory: str) -> str:
        """Sequence-classification checkpoint (safetensors, adapters merged, config, tokenizer) written by rank 0.

        With a peft adapter the directory also gets `adapter/` (peft's format, the head included as
        modules_to_save): PeftModel.from_pretrained(AutoModelForSequenceClassification base, adapter).
        """
        engine = self._require_engine()
        engine.save_hf(directory, config=self.hf_config, tokenizer=self.tokenizer)
        if has_adapter(engine.module):
            save_adapter(engine.module, Path(directory) / ADAPTER_DIR, rank=self.rank)
        return str(Path(directory))
