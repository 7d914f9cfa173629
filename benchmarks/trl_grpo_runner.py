"""TRL's GRPOTrainer on the tiny world, for benchmarks.trl_compare (run in a subprocess, TRL on PYTHONPATH).

TRL is not a project dependency: benchmarks.trl_compare installs it into a cache directory and puts
that directory on PYTHONPATH for this process only. Writes per-RL-step wall times and rewards as JSON.

    PYTHONPATH=<trl dir> python -m benchmarks.trl_grpo_runner --out trl.json --steps 30 --prompts 8 --n 8
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger("benchmarks.trl_grpo_runner")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="sub_1d")
    parser.add_argument("--steps", type=int, default=30, help="RL steps (one generation batch each)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.data.tiny_world import check_answer, generate_rows

    start = time.perf_counter()
    tasks = set(args.task.split("+"))
    rows = [r for r in generate_rows("rl", "train") if r["task"] in tasks]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )

    def tiny_world_reward(prompts, completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if check_answer(t, a) else 0.0 for t, a in zip(texts, answer)]

    sequences = args.prompts * args.n
    steps_per_generation = sequences // args.train_batch
    config = GRPOConfig(
        output_dir=str(args.out.parent / "trl-output"),
        per_device_train_batch_size=args.train_batch,
        gradient_accumulation_steps=1,
        num_generations=args.n,
        steps_per_generation=steps_per_generation,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        scale_rewards="group",
        loss_type="dapo",
        max_steps=args.steps * steps_per_generation,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=tiny_world_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Stamp()],
    )
    setup_s = time.perf_counter() - start
    trainer.train()
    total_s = time.perf_counter() - start
    optimizer_step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    rl_step_s = [
        sum(optimizer_step_s[i : i + steps_per_generation])
        for i in range(0, len(optimizer_step_s), steps_per_generation)
    ]
    # the reward is logged once per generation batch (the first optimizer step of each): one per RL step
    logged = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [h["reward"] for h in logged]
    lengths = [h.get("completions/mean_length") for h in logged]
    args.out.write_text(
        json.dumps(
            {
                "trl_version": trl.__version__,
                "torch_threads": torch.get_num_threads(),
                "setup_s": setup_s,
                "total_s": total_s,
                "steps_per_generation": steps_per_generation,
                "rl_step_s": rl_step_s,
                "rewards": rewards,
                "response_length": lengths,
                "config": {
                    k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
