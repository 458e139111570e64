"""Tiny local models, tokenizer and data for the offline example, the tests and the benchmarks.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained in memory on the task's own text, and
the models are randomly initialized Qwen3-shaped causal LMs. Real runs load models with `from_pretrained` as usual.
"""

from __future__ import annotations

import random

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def arithmetic_example(rng: random.Random, digits: int = 2) -> dict[str, list[dict[str, str]]]:
    """One conversation: a sum of two numbers and its answer."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return {
        "messages": [
            {"role": "user", "content": f"What is {a}+{b}?"},
            {"role": "assistant", "content": f"{a}+{b}={a + b}"},
        ]
    }


def arithmetic_dataset(n: int, seed: int = 0, digits: int = 2) -> Dataset:
    """`n` conversations in TRL's `messages` format."""
    rng = random.Random(seed)
    return Dataset.from_list([arithmetic_example(rng, digits) for _ in range(n)])


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on arithmetic chat text, with a ChatML template; `<|im_end|>` ends a turn."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(2000):
        for message in arithmetic_example(rng, digits=rng.choice([1, 2, 3]))["messages"]:
            corpus.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    vocab_size: int | None = None,
) -> Qwen3ForCausalLM:
    """A randomly initialized Qwen3-shaped causal LM.

    Its vocabulary is the tokenizer's unless `vocab_size` asks for more rows (a benchmark that wants a real model's
    head cost); the tokenizer then produces ids in the first rows only.
    """
    import torch

    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
