import pytest
import torch
from trl.experimental.utils import DataCollatorForChatML

from trl_npd.prompts import PromptOnlyCollator, PromptStream, extract_prompt_ids


def test_ranks_get_disjoint_shards_that_cover_the_dataset(tokenizer, dataset):
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=96)
    seen = []
    for rank in range(3):
        stream = PromptStream(dataset, collator, seed=0, rank=rank, world_size=3)
        shard = len(range(rank, len(dataset), 3))
        seen.append({p.index for p in stream.take(shard)})
    assert set.union(*seen) == set(range(len(dataset)))
    assert sum(len(s) for s in seen) == len(dataset)


def test_each_pass_is_a_fresh_seeded_permutation_and_resume_continues(tokenizer, dataset):
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=96)
    stream = PromptStream(dataset, collator, seed=3)
    first_pass = [p.index for p in stream.take(len(dataset))]
    second_pass = [p.index for p in stream.take(len(dataset))]
    assert sorted(first_pass) == sorted(second_pass) == list(range(len(dataset)))
    assert first_pass != second_pass
    again = PromptStream(dataset, collator, seed=3)
    assert [p.index for p in again.take(10)] == first_pass[:10]
    resumed = PromptStream(dataset, collator, seed=3, start_position=10)
    assert [p.position for p in resumed.take(5)] == list(range(10, 15))
    assert [p.index for p in PromptStream(dataset, collator, seed=3, start_position=10).take(5)] == first_pass[10:15]


def test_prompts_match_the_collator_and_long_ones_are_truncated_from_the_left(tokenizer, dataset):
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=96)
    expected = tokenizer.apply_chat_template(dataset[0]["messages"][:1], add_generation_prompt=True, tokenize=False)
    expected_ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert extract_prompt_ids(collator, [dataset[0]])[0] == expected_ids
    stream = PromptStream(dataset.select([0]), collator, seed=0, max_prompt_tokens=5)
    (prompt,) = stream.take(1)
    assert prompt.truncated and prompt.ids == expected_ids[-5:]


def test_a_collator_without_prompts_is_refused(dataset):
    with pytest.raises(ValueError, match="must return `prompts`"):
        extract_prompt_ids(lambda rows: {"input_ids": torch.zeros(1, 1)}, [dataset[0]])


def test_prompt_only_collator_handles_text_and_conversations(tokenizer):
    collator = PromptOnlyCollator(tokenizer)
    text = {"prompt": "What is 1+2?"}
    chat = {"prompt": [{"role": "user", "content": "What is 1+2?"}]}
    ids = extract_prompt_ids(collator, [text, chat])
    assert ids[0] == tokenizer("What is 1+2?", add_special_tokens=False)["input_ids"]
    rendered = tokenizer.apply_chat_template(chat["prompt"], add_generation_prompt=True, tokenize=False)
    assert ids[1] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    batch = collator([text, chat])
    assert batch["prompt_attention_mask"][0, 0] == 0  # left padded
