"""Every bad input in docs/usage.md's table gets exactly the message the table shows.

The table is the source: each row names a case below by its id, and its message (with `…` for the values of the
run) must match what the case raises or logs. A case without a row, or a row without a case, fails too.
"""

import logging
import os
import re

import pytest
from datasets import Dataset, IterableDataset
from tiny_models import build as build_tiny
from transformers import Qwen3Config, Qwen3ForCausalLM
from trl.experimental.gkd import GKDConfig

from trl_npd import NearPolicyDistillTrainer
from trl_npd.engine import Completion, TransformersEngine
from trl_npd.toy import build_tokenizer

USAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "usage.md")


def documented_rows() -> dict[str, tuple[str, str]]:
    """{test id: (what you get, message)} from the bad-inputs table of docs/usage.md."""
    with open(USAGE) as f:
        text = f.read()
    table = text.split("## Bad inputs", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (match := re.fullmatch(r"`([a-z0-9-]+)`", cells[3])):
            rows[match.group(1)] = (cells[1], cells[2])
    return rows


CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


class Env:
    """What a case needs: the fixtures, and helpers that return the message a bad input gets."""

    def __init__(self, student, teacher, tokenizer, dataset, make_config, tmp_path, caplog, monkeypatch):
        self.student, self.teacher, self.tokenizer, self.dataset = student, teacher, tokenizer, dataset
        self.make_config, self.tmp_path, self.caplog, self.monkeypatch = make_config, tmp_path, caplog, monkeypatch

    def trainer(self, *, student=None, teacher=None, tokenizer=None, dataset="default", args=None, **kwargs):
        return NearPolicyDistillTrainer(
            model=student or self.student,
            teacher_model=teacher or self.teacher,
            args=args or self.make_config(),
            train_dataset=self.dataset if isinstance(dataset, str) else dataset,
            processing_class=tokenizer or self.tokenizer,
            **kwargs,
        )

    @staticmethod
    def raised(fn) -> tuple[str, str]:
        with pytest.raises(Exception) as error:
            fn()
        return type(error.value).__name__, str(error.value)

    def warned(self, fn, logger: str) -> tuple[str, str]:
        with self.caplog.at_level(logging.WARNING, logger=logger):
            fn()
        messages = [r.getMessage() for r in self.caplog.records if r.name == logger and r.levelno == logging.WARNING]
        assert len(messages) == 1, messages  # said once, not at every batch
        return "warning", messages[0]

    def teacher_dir(self, tokenizer) -> str:
        """The teacher saved with `tokenizer`, to be loaded by name as a script would."""
        path = str(self.tmp_path / "teacher")
        self.teacher.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path


PROMPTS_ONLY = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(8)]


@case("gkd-config")
def _(env):
    return env.raised(lambda: env.trainer(args=GKDConfig(output_dir=str(env.tmp_path), bf16=False)))


@case("no-train-dataset")
def _(env):
    return env.raised(lambda: env.trainer(dataset=None))


@case("empty-train-dataset")
def _(env):
    return env.raised(lambda: env.trainer(dataset=env.dataset.select([])))


@case("iterable-train-dataset")
def _(env):
    row = env.dataset[0]
    return env.raised(lambda: env.trainer(dataset=IterableDataset.from_generator(lambda: iter([row]))))


@case("prompt-only-with-lmbda-below-1")
def _(env):
    return env.raised(lambda: env.trainer(dataset=Dataset.from_list(PROMPTS_ONLY), args=env.make_config(lmbda=0.5)))


@case("prompt-only-eval-dataset")
def _(env):
    prompts = Dataset.from_list(PROMPTS_ONLY)
    return env.raised(lambda: env.trainer(dataset=prompts, eval_dataset=prompts))


@case("tokenizer-without-pad-token")
def _(env):
    no_pad = build_tokenizer()
    no_pad.pad_token = None
    return env.raised(lambda: env.trainer(tokenizer=no_pad))


@case("tokenizer-larger-than-the-models")
def _(env):
    return env.raised(lambda: env.trainer(tokenizer=build_tokenizer(vocab_size=600)))


@case("teacher-vocab-larger")
def _(env):
    config = Qwen3Config(**{**env.teacher.config.to_dict(), "vocab_size": len(env.tokenizer) + 64})
    return env.raised(lambda: env.trainer(teacher=Qwen3ForCausalLM(config)))


@case("teacher-vocab-smaller")
def _(env):
    config = Qwen3Config(**{**env.teacher.config.to_dict(), "vocab_size": len(env.tokenizer) - 64})
    return env.raised(lambda: env.trainer(teacher=Qwen3ForCausalLM(config)))


@case("teacher-tokenizer-differs")
def _(env):
    other = build_tokenizer(seed=1)  # as many tokens, learned from other text: other ids
    assert len(other) == len(env.tokenizer) and other.get_vocab() != env.tokenizer.get_vocab()
    return env.raised(lambda: env.trainer(teacher=env.teacher_dir(other)))


@case("chat-templates-differ")
def _(env):
    other = build_tokenizer()
    other.chat_template = other.chat_template.replace("\n", "\n\n")
    return env.warned(lambda: env.trainer(teacher=env.teacher_dir(other)), "trl_npd.checks")


@case("quantized-student")
def _(env):
    env.student.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit load
    return env.raised(lambda: env.trainer())


@case("lmbda-out-of-range")
def _(env):
    return env.raised(lambda: env.make_config(lmbda=1.5))


@case("beta-out-of-range")
def _(env):
    return env.raised(lambda: env.make_config(beta=-0.1))


@case("max-new-tokens-beyond-context")
def _(env):
    context = env.student.config.max_position_embeddings
    return env.raised(lambda: env.trainer(args=env.make_config(max_new_tokens=context, max_length=2 * context)))


@case("max-length-beyond-learned-positions")
def _(env):
    gpt2 = [build_tiny("GPT-2", env.tokenizer, seed=seed, n_positions=48) for seed in (1, 2)]
    return env.warned(
        lambda: env.trainer(student=gpt2[0], teacher=gpt2[1], args=env.make_config(max_length=64)), "trl_npd.checks"
    )


@case("max-length-without-room")
def _(env):
    return env.raised(lambda: env.make_config(max_length=8, max_new_tokens=8))


@case("max-staleness-below-sync")
def _(env):
    return env.raised(lambda: env.make_config(weight_sync_steps=4, max_staleness=1))


@case("buffer-smaller-than-a-batch")
def _(env):
    return env.raised(lambda: env.make_config(generation_batch_size=8, buffer_size=4))


@case("generator-timeout-not-positive")
def _(env):
    return env.raised(lambda: env.make_config(generator_timeout_s=0))


@case("vllm-with-ifd")
def _(env):
    return env.raised(lambda: env.make_config(generation_backend="vllm", ifd_filter=True))


@case("output-dir-not-writable")
def _(env):
    blocker = env.tmp_path / "a-file"
    blocker.write_text("")  # a folder below a file cannot be made, whoever runs this (root included)
    args = env.make_config(output_dir=str(blocker / "out"), save_strategy="steps", save_steps=2)
    return env.raised(lambda: env.trainer(args=args))


@case("prompts-longer-than-max-length")
def _(env):
    question = " ".join(f"{i}+{i}" for i in range(60))
    rows = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "0"}]}] * 8
    args = env.make_config(max_steps=2, max_length=40, max_new_tokens=8, generator_mode="inline")
    trainer = env.trainer(dataset=Dataset.from_list(rows), args=args)
    found = env.warned(trainer.train, "trl_npd.step_batches")
    assert trainer.npd_metrics.totals.truncated_prompts == 8  # counted, every one
    return found


def _empty_completions(env, every: int) -> None:
    """The engine returns an empty completion for every `every`-th prompt, as a remote engine may."""
    generate = TransformersEngine.generate

    def patched(self, prompts):
        completions = generate(self, prompts) if every > 1 else [None] * len(prompts)
        return [Completion([], [], None) if i % every == 0 else c for i, c in enumerate(completions)]

    env.monkeypatch.setattr(TransformersEngine, "generate", patched)


@case("empty-completion")
def _(env):
    _empty_completions(env, every=2)
    trainer = env.trainer(args=env.make_config(max_steps=3, generator_mode="inline"))
    found = env.warned(trainer.train, "trl_npd.step_batches")
    totals = trainer.npd_metrics.totals
    assert totals.dropped["empty_completion"] >= 12 and totals.consumed_samples == 12
    assert totals.generated_samples == totals.accounted()
    return found


@case("only-empty-completions")
def _(env):
    _empty_completions(env, every=1)
    return env.raised(env.trainer(args=env.make_config(max_steps=3, generator_mode="inline")).train)


@case("no-prompt-with-a-token")
def _(env):
    rows = Dataset.from_list([{"prompt": ""}] * 8)  # plain-text prompts that render to no token at all
    return env.raised(env.trainer(dataset=rows, args=env.make_config(generator_mode="inline")).train)


def test_every_documented_bad_input_has_a_case_and_every_case_a_row():
    rows = documented_rows()
    assert len(rows) >= 15
    assert set(rows) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_input_gets_the_documented_message(
    name, student, teacher, tokenizer, dataset, make_config, tmp_path, caplog, monkeypatch
):
    outcome, message = documented_rows()[name]
    env = Env(student, teacher, tokenizer, dataset, make_config, tmp_path, caplog, monkeypatch)
    kind, text = CASES[name](env)
    assert f"`{kind}`" in outcome, (outcome, kind)
    pattern = ".*?".join(re.escape(part) for part in message.split("…"))
    assert re.fullmatch(pattern, text, flags=re.S), f"\ndocumented: {message}\nactual:     {text}"
