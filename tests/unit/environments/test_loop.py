"""The multi-turn rollout loop with a scripted policy (the engine's side is its own tests'): token-in-token-out on
a tokenizer that merges across the turn boundary, the loss mask, interleaving past a slow tool, timeouts, a
failing environment and the turn and token limits."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from tokenizers import Tokenizer, decoders, models, trainers

from rlhf.environments import AgentLimits, Environment, ObservationRenderer, StepResult, run_trajectories
from rlhf.environments.loop import TIMEOUT_OBSERVATION


@pytest.fixture(scope="module")
def merging_tokenizer() -> Tokenizer:
    """A BPE whose vocabulary has "ab" as one token: "a" then "b" tokenized again become ["ab"]."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"], initial_alphabet=list("abcxyz=!"))
    tokenizer.train_from_iterator(["ab"] * 50 + ["xyz", "c="], trainer)
    assert tokenizer.encode("ab").tokens == ["ab"]
    return tokenizer


@dataclass
class Gen:
    token_ids: list[int]
    logprobs: list[float]


class Scripted:
    """A policy that answers turn t of the prompt starting with token p with script[p][t]; records its calls."""

    def __init__(self, script: dict[int, list[list[int]]]) -> None:
        self.script, self.turns, self.calls = script, {}, []

    def __call__(self, contexts, seed):
        self.calls.append([c[0] for c in contexts])
        out = []
        for context in contexts:
            t = self.turns.get(context[0], 0)
            self.turns[context[0]] = t + 1
            ids = self.script[context[0]][t]
            out.append(Gen(ids, [-0.25] * len(ids)))
        return out


class Echo(Environment):
    """Observes `reply` after each turn until the turn's text contains "!", then done with reward 1; a row's
    "sleep" delays its first step, "fail" raises in step."""

    def __init__(self, reply: str = "b") -> None:
        self.reply, self.row, self.steps = reply, {}, 0

    def reset(self, row):
        self.row = row
        return ""

    def step(self, action):
        self.steps += 1
        if self.row.get("fail"):
            raise RuntimeError("environment bug")
        if self.steps == 1 and self.row.get("sleep"):
            time.sleep(self.row["sleep"])
        if "!" in action:
            return StepResult(done=True, reward=1.0)
        return StepResult(self.reply, reward=0.5, info={"tool_calls": 1})


LIMITS = AgentLimits(max_turns=4, max_tokens=32, step_timeout_s=5.0)


def run(tokenizer, rows, script, *, limits=LIMITS, reply="b"):
    ids = {row["prompt"]: tokenizer.encode(row["prompt"]).ids for row in rows}
    policy = Scripted({ids[row["prompt"]][0]: [tokenizer.encode(t).ids for t in script[row["prompt"]]] for row in rows})
    trajectories = run_trajectories(
        rows,
        [ids[row["prompt"]] for row in rows],
        1,
        generate=policy,
        make_env=lambda: Echo(reply),
        render=ObservationRenderer(lambda text: tokenizer.encode(text).ids),
        decode=tokenizer.decode,
        limits=limits,
        seed=0,
    )
    return trajectories, policy


def test_trained_ids_are_the_sampled_ids_plus_the_environments(merging_tokenizer):
    tok = merging_tokenizer
    (trajectory,), _ = run(tok, [{"prompt": "c="}], {"c=": ["a", "c!"]})
    a, b, c, bang = (tok.token_to_id(t) for t in ("a", "b", "c", "!"))
    assert trajectory.response_ids == [a, b, c, bang]  # sampled "a", observed "b", sampled "c", "!"
    assert trajectory.loss_mask == [1, 0, 1, 1]  # no loss on the environment's token
    assert trajectory.logprobs == [-0.25, 0.0, -0.25, -0.25]
    assert (trajectory.end, trajectory.turns, trajectory.turn_rewards) == ("done", 2, [0.5, 1.0])
    # the same conversation as text, tokenized again, is not what was sampled: "a" + "b" merge into "ab"
    text = tok.decode(trajectory.prompt_ids + trajectory.response_ids)
    assert tok.encode(text).ids != trajectory.prompt_ids + trajectory.response_ids
    assert tok.token_to_id("ab") in tok.encode(text).ids


def test_a_slow_tool_delays_only_its_own_trajectory(merging_tokenizer):
    rows = [{"prompt": "x", "sleep": 1.0}, {"prompt": "y"}, {"prompt": "z"}]
    script = {"x": ["a", "c!"], "y": ["a", "a", "c!"], "z": ["a", "a", "c!"]}
    trajectories, policy = run(merging_tokenizer, rows, script)
    x, y, z = (merging_tokenizer.encode(p).ids[0] for p in "xyz")
    assert [t.end for t in trajectories] == ["done"] * 3
    assert policy.calls[0] == [x, y, z]
    # y and z finish their three turns while x's tool sleeps (batched together or not, as their tools answer);
    # x's second turn comes alone at the end
    later = policy.calls[1:]
    assert later[-1] == [x] and all(x not in call for call in later[:-1])
    assert sum(y in call for call in later) == 2 and sum(z in call for call in later) == 2


def test_a_tool_past_its_timeout_ends_the_turn_with_an_error_and_nothing_hangs(merging_tokenizer):
    limits = AgentLimits(max_turns=2, max_tokens=64, step_timeout_s=0.3)
    start = time.monotonic()
    (trajectory,), _ = run(merging_tokenizer, [{"prompt": "x", "sleep": 5.0}], {"x": ["a", "c!"]}, limits=limits)
    assert time.monotonic() - start < 2.0
    observed = merging_tokenizer.encode(TIMEOUT_OBSERVATION.format(seconds=0.3)).ids
    a = merging_tokenizer.token_to_id("a")
    assert trajectory.response_ids[: 1 + len(observed)] == [a, *observed]
    assert trajectory.counters["tool_timeouts"] == 1 and trajectory.turns == 2 and trajectory.end == "done"


def test_a_failing_environment_ends_its_trajectory_only(merging_tokenizer):
    rows = [{"prompt": "x", "fail": True}, {"prompt": "y"}]
    trajectories, _ = run(merging_tokenizer, rows, {"x": ["a"], "y": ["a", "c!"]})
    assert [t.end for t in trajectories] == ["error", "done"]
    assert trajectories[0].counters["env_errors"] == 1 and trajectories[0].turns == 1


def test_turn_and_token_limits(merging_tokenizer):
    limits = AgentLimits(max_turns=3, max_tokens=64, step_timeout_s=5.0)
    (turns,), _ = run(merging_tokenizer, [{"prompt": "y"}], {"y": ["a", "a", "a", "a"]}, limits=limits)
    assert turns.end == "max_turns" and turns.turns == 3
    assert turns.turn_rewards == [0.5, 0.5, 0.5]  # the last turn is judged, and no observation follows it
    assert turns.loss_mask == [1, 0, 1, 0, 1]
    limits = AgentLimits(max_turns=3, max_tokens=3, step_timeout_s=5.0)
    (tokens,), _ = run(merging_tokenizer, [{"prompt": "y"}], {"y": ["a", "cccc"]}, limits=limits)
    assert tokens.end == "max_tokens" and len(tokens.response_ids) == 3 and tokens.loss_mask == [1, 0, 1]


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A Qwen-style (ChatML) template with any role, tool included."""


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A ChatML tokenizer whose BPE has "\\na" as one token: the model's "a" sampled right after the template's
    "assistant\\n" becomes "\\na" when the conversation's text is tokenized again."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.decoder = decoders.Fuse()
    specials = ["[UNK]", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=60, special_tokens=specials, initial_alphabet=list("abcdefilmnorstuxyz=!\n")
    )
    backend.train_from_iterator(["\na"] * 50 + ["user", "assistant", "tool", "c="], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    assert tokenizer.tokenize("\na") == ["\na"]
    return tokenizer


def test_the_chat_templates_tool_turn_is_read_off_the_template(chat_tokenizer):
    from rlhf.data.tokenizer import tool_turn_template

    assert tool_turn_template(chat_tokenizer) == "<|im_end|>\n<|im_start|>tool\n{observation}<|im_end|>\n<|im_start|>assistant\n"  # fmt: skip
    chat_tokenizer.chat_template = CHATML.replace("{% for m in messages %}", "{% for m in messages if m['role'] != 'tool' %}")  # fmt: skip
    try:
        assert tool_turn_template(chat_tokenizer) is None  # a template that drops tool messages has no tool turn
    finally:
        chat_tokenizer.chat_template = CHATML


def test_no_tool_turn_without_a_tool_role():
    from rlhf.data.tokenizer import tool_turn_template, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(["3+4=7", "reverse abc"])
    assert tool_turn_template(tokenizer) is None  # the tiny template raises on any role but system/user/assistant
    tokenizer.chat_template = None
    assert tool_turn_template(tokenizer) is None


def test_chat_tool_turns_are_appended_as_ids_and_close_the_model_turn_once(chat_tokenizer):
    """Turn 1 stops on its stop string (the tool turn closes it), turn 2 ends on <|im_end|> itself (not written
    twice), turn 3 ends the trajectory; the trained ids are the sampled ids plus the rendered tool turns, which a
    re-tokenized conversation would not give back."""
    from rlhf.data.tokenizer import tool_turn_template

    tok = chat_tokenizer
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = encode(tok.apply_chat_template([{"role": "user", "content": "c="}], add_generation_prompt=True, tokenize=False))  # fmt: skip
    end, a, c, bang = tok.convert_tokens_to_ids(["<|im_end|>", "a", "c", "!"])
    policy = Scripted({prompt[0]: [[a], [a, end], [c, bang, end]]})
    renderer = ObservationRenderer(encode, tool_turn_template(tok), special_ids=tok.all_special_ids)
    (trajectory,) = run_trajectories(
        [{"prompt": "c="}], [prompt], 1, generate=policy, make_env=lambda: Echo("b"), render=renderer,
        decode=tok.decode, limits=LIMITS, seed=0,
    )  # fmt: skip
    tool_turn = encode("<|im_end|>\n<|im_start|>tool\nb<|im_end|>\n<|im_start|>assistant\n")
    assert tool_turn[0] == end
    assert trajectory.response_ids == [a, *tool_turn, a, end, *tool_turn[1:], c, bang, end]
    assert trajectory.loss_mask == [1] + [0] * len(tool_turn) + [1, 1] + [0] * (len(tool_turn) - 1) + [1, 1, 1]
    text = tok.decode(trajectory.prompt_ids + trajectory.response_ids)
    assert encode(text) != trajectory.prompt_ids + trajectory.response_ids  # "assistant\n" + "a" re-tokenizes as "\na"
