"""Tiny causal LMs of many architectures, built from transformers' config classes at random init.

All share the toy tokenizer (`trl_npd.toy.build_tokenizer`): its vocabulary and special tokens go into every config,
so any two of them can be a student and a teacher. Sizes are the smallest each architecture accepts comfortably.
The generator process must be able to import this module (tests put `tests/` on the path, see conftest.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

# name -> (config class, causal LM class, size arguments). Defaults are the architecture's own otherwise: Gemma 2
# keeps its final_logit_softcapping=30, Bloom and MPT their ALiBi. Cohere and Granite get a logit scale, as their
# checkpoints have (Cohere multiplies the logits by logit_scale, Granite divides them by logits_scaling).
_LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 16}),
    "Qwen3-MoE": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**_LLAMA_LIKE, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
    "Gemma 2": ("Gemma2Config", "Gemma2ForCausalLM", {**_LLAMA_LIKE, "head_dim": 16}),
    "Gemma 3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 16}),
    "GPT-2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 2}),
    "GPT-NeoX": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    ),
    "OPT": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "word_embed_proj_dim": 32,
        },
    ),
    "Phi-3": ("Phi3Config", "Phi3ForCausalLM", _LLAMA_LIKE),
    "Falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
    ),
    "Bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 32, "n_layer": 2, "n_head": 2}),
    "MPT": ("MptConfig", "MptForCausalLM", {"d_model": 32, "n_heads": 2, "n_layers": 2}),
    "Cohere": ("CohereConfig", "CohereForCausalLM", {**_LLAMA_LIKE, "logit_scale": 0.25}),
    "Granite": ("GraniteConfig", "GraniteForCausalLM", {**_LLAMA_LIKE, "logits_scaling": 4.0}),
    # more logit transforms, each read from another config field (only the logit-transform tests build these)
    "VaultGemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", {**_LLAMA_LIKE, "head_dim": 16}),
    "RecurrentGemma": (
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        {**_LLAMA_LIKE, "lru_width": 32, "block_types": ["recurrent", "attention"]},
    ),
    "Cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {**_LLAMA_LIKE, "logit_scale": 0.25}),
    "Falcon-H1": (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        {
            **_LLAMA_LIKE,
            "head_dim": 16,
            "mamba_d_ssm": 32,
            "mamba_n_heads": 2,
            "mamba_d_head": 16,
            "mamba_d_state": 8,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
            "lm_head_multiplier": 0.5,
        },
    ),
    "HyperCLOVA X": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", {**_LLAMA_LIKE, "logits_scaling": 0.5}),
    # logits_scaling is hidden_size / dim_model_base = 4, applied to the hidden states of a bias-free head
    "MiniCPM3": (
        "MiniCPM3Config",
        "MiniCPM3ForCausalLM",
        {
            **_LLAMA_LIKE,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "dim_model_base": 8,
        },
    ),
}


def build(name: str, tokenizer: Any, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A randomly initialized `name` model sized by ARCHITECTURES, on the shared tokenizer's vocabulary."""
    config_name, model_name, sizes = ARCHITECTURES[name]
    if not hasattr(transformers, model_name):
        pytest.skip(f"this transformers has no {model_name}")
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**sizes, **overrides},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_student_and_teacher(folder: Any, tokenizer: Any) -> dict[str, str]:
    """The toy one-layer student (hidden 32) and teacher (hidden 64), each saved with the tokenizer under `folder`,
    as a script would name them: {"student": path, "teacher": path}."""
    from trl_npd.toy import build_model

    paths = {}
    for role, (hidden, seed) in {"student": (32, 1), "teacher": (64, 2)}.items():
        path = folder / role
        build_model(tokenizer, hidden_size=hidden, num_layers=1, seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[role] = str(path)
    return paths
