"""The real-model arena's machinery (benchmarks/arena_real.py, benchmarks/smollm2.py) without the real model.

SmolLM2 comes from a wheel that only the benchmark set-up installs, so here a tiny Llama built in memory stands in for
it: the same architecture family, so pruning, prompts, references, metrics and the run records are all exercised.
"""

import argparse
import json
import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trl_npd.toy import build_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import arena_real
import smollm2


def tiny_llama(tokenizer, layers=4):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def test_pruning_keeps_evenly_spaced_layers_with_their_weights_and_a_working_cache():
    assert smollm2.kept_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert smollm2.kept_layers(30, 2) == [0, 29] and smollm2.kept_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot be cut"):
        smollm2.kept_layers(4, 5)
    tokenizer = build_tokenizer()
    teacher = tiny_llama(tokenizer, layers=5)
    student = smollm2.pruned_student(teacher, 3)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for new, old in enumerate(smollm2.kept_layers(5, 3)):
        assert torch.equal(student.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)
        assert student.model.layers[new].self_attn.layer_idx == new
    assert len(teacher.model.layers) == 5  # the teacher is untouched
    ids = torch.tensor([[1, 5, 6, 7]])
    out = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # the KV cache works
    assert out.shape == (1, 7)


def test_held_out_questions_are_never_trained_on_in_any_phrasing():
    answered = {row["key"] for row in smollm2.questions()}
    held_out, train = smollm2.prompt_splits(answered, held_out_keys=40, held_out_wrappers=7)
    assert {row["key"] for row in held_out}.isdisjoint({row["key"] for row in train})
    assert not {row["prompt"] for row in held_out} & {row["prompt"] for row in train}
    assert len(held_out) == 40 * 7 and len(train) == (len(answered) - 40) * len(smollm2.WRAPPERS)
    assert len({row["prompt"] for row in train}) == len(train)  # every phrasing of a question differs


def test_agreement_and_rouge_l():
    assert arena_real.first_sentence("The capital of France is Paris. It is big.") == "the capital of france is paris"
    assert arena_real.first_sentence("Paris!\nMore") == "paris"
    assert arena_real.rouge_l("the cat sat", "the cat sat") == 1.0
    assert arena_real.rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS "a c": P = R = 2/4
    assert arena_real.rouge_l("", "a") == 0.0 and arena_real.rouge_l("x y", "a b") == 0.0


def test_a_seed_runs_every_method_and_records_the_real_arena_fields(tmp_path, monkeypatch):
    tokenizer = build_tokenizer()
    teacher = tiny_llama(tokenizer)
    monkeypatch.setattr(smollm2, "load_teacher", lambda cache_dir: (tokenizer, teacher))
    # a random teacher never says "Paris": for the machinery, every answer counts as answered
    questions = smollm2.questions
    monkeypatch.setattr(smollm2, "questions", lambda: [{**row, "expected": ""} for row in questions()])
    preset = arena_real.PRESETS["micro"]
    args = argparse.Namespace(cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "seed-1.json"))
    methods = ["sft", "gkd", "distillation", "npd"]
    report = arena_real.run_seed(preset, 1, methods, dict(preset["lr"]), args)

    assert [run["method"] for run in report["runs"]] == methods
    assert report["eval_prompts"] == preset["held_out_keys"] * preset["held_out_wrappers"]
    for run in report["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        for point in run["curve"]:
            assert 0 <= point["acc"] <= 1 and 0 <= point["rouge_l"] <= 1 and point["kl_teacher"] >= 0
            assert point["reverse_kl"] >= 0 and 0 <= point["acc_sampled"] <= 1
        assert run["final_kl_teacher_smoothed"] == pytest.approx(sum(p["kl_teacher"] for p in run["curve"][1:]) / 2)
        assert "time_to_gkd_final_s" in run
    gkd = report["runs"][1]
    assert gkd["time_to_gkd_final_kl_s"] is not None  # GKD's own curve reaches its own final value
    for run in report["runs"]:  # the first checkpoint whose trailing mean (over 2) is at or below GKD's final KL
        kls = [p["kl_teacher"] for p in run["curve"]]
        trailing = [sum(kls[max(0, i - 1) : i + 1]) / len(kls[max(0, i - 1) : i + 1]) for i in range(len(kls))]
        level = gkd["final_kl_teacher_smoothed"]
        reached = [p["wall_s"] for p, kl in zip(run["curve"], trailing, strict=True) if kl <= level + 1e-12]
        expected = reached[0] if reached else None
        assert run["time_to_gkd_final_kl_s"] == expected
    npd = report["runs"][-1]["npd"]
    assert len(npd["sample_drift"]) == npd["trained_samples"] == 2 * 2
    # written after each method, so a stopped session keeps the finished ones
    assert [run["method"] for run in json.load(open(args.out))["runs"]] == methods
    # the references are cached in one file, keyed by the questions and the preset's settings
    assert len(os.listdir(tmp_path / "cache")) == 1
