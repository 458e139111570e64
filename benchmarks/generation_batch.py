"""What a larger generation batch buys and what it costs: cost per sample against the staleness it adds.

    python benchmarks/generation_batch.py --out results/generation_batch.json

The embedded engine samples the throughput benchmark's cpu-tiny student (64 new tokens, temperature 1) one batch at
a time, on one thread as a CPU generator process does, for each batch size. A decoding step costs a fixed overhead
(the model's modules, the cache, the sampler) plus work that grows with the batch, so the cost per sample falls as
the batch grows. The price is staleness: a batch is sampled by one policy version, and when the generator runs
ahead its last sample is trained on `weight_sync_steps + 3 * batch / per_step - 2` optimizer steps after that
version's weights were taken (the bound `NearPolicyDistillConfig.generation_sizes` sizes by, derived in
`docs/design.md`, "sized from the staleness bound"; tests/test_trainer.py checks it on a generator that runs
ahead). The table gives both for the default `weight_sync_steps=4`, and whether the batch fits the default
`max_staleness=8` at an effective batch of 8.

It also times the sampler's own overhead: the same sampling in a minimal decoding loop (one forward per token on
transformers' cache, a softmax, a multinomial draw; nothing else), against the engine's `generate` with its
logits processor, which records the behaviour log-probs, and its stopping criterion. The gap is what `generate`
and the engine add per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from kit.report import print_table, stamp, write_report
from throughput import PRESETS, build_models
from transformers import DynamicCache

from trl_npd.engine import EngineConfig, TransformersEngine
from trl_npd.toy import arithmetic_dataset

BATCHES = (4, 8, 16, 32, 64, 128)
COLUMNS = [  # the table's: (header, report key, format)
    ("batch", "generation_batch_size", ""),
    ("ms/sample", "ms_per_sample", ".1f"),
    (f"vs batch {BATCHES[0]}", "vs_smallest", ".2f"),
    ("minimal loop", "minimal_loop_ms_per_sample", ".1f"),
    ("overhead", "sampler_overhead_frac", ".0%"),
    ("worst staleness", "worst_staleness_steps", ".1f"),
    ("fits the default bound", "fits_max_staleness", ""),
]


@torch.no_grad()
def minimal_decode(model: Any, prompts: list[list[int]], new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """Sampling at temperature 1 with nothing but the model's forward, its cache and the draw: the floor that
    `generate` is measured against. Left-padded like the engine's batches; every row runs all `new_tokens`."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache
    ).logits[:, -1]
    next_position = position_ids[:, -1:] + 1
    tokens = []
    for _ in range(new_tokens):
        token = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)
        tokens.append(token)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        logits = model(
            input_ids=token, attention_mask=attention_mask, position_ids=next_position, past_key_values=cache
        ).logits[:, -1]
        next_position = next_position + 1
    return torch.cat(tokens, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/generation_batch.json")
    parser.add_argument("--samples", type=int, default=256, help="samples timed per batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-step", type=int, default=8, help="on-policy samples an optimizer step takes")
    parser.add_argument("--weight-sync-steps", type=int, default=4)
    parser.add_argument("--max-staleness", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = PRESETS["cpu-tiny"]
    tokenizer, student, _ = build_models(preset)
    student.eval()
    rows = arithmetic_dataset(args.samples, seed=1)
    prompts = [
        tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False) for row in rows
    ]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    engine = EngineConfig(
        max_new_tokens=preset["new_tokens"],
        temperature=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    sampler = TransformersEngine(student, engine)
    sampler.generate(prompt_ids[:8])  # warm-up
    minimal_decode(student, prompt_ids[:8], 2, tokenizer.pad_token_id)
    ms: dict[int, list[float]] = {batch: [] for batch in BATCHES}
    minimal_ms: dict[int, list[float]] = {batch: [] for batch in BATCHES}
    batches = [batch for batch in BATCHES if batch <= args.samples]  # each timed on whole batches of its size
    for _ in range(args.rounds):  # rounds interleave the batch sizes, so drift in the machine hits them alike
        for batch in batches:
            start, new_tokens = time.perf_counter(), 0
            for i in range(0, args.samples, batch):
                completions = sampler.generate(prompt_ids[i : i + batch])
                new_tokens = max(new_tokens, max(len(c.ids) for c in completions))
            ms[batch].append(1000 * (time.perf_counter() - start) / args.samples)
            # the floor runs as many decoding steps as generate ran on its longest batch (random-init models
            # rarely stop early, so nearly always all of them)
            start = time.perf_counter()
            for i in range(0, args.samples, batch):
                minimal_decode(student, prompt_ids[i : i + batch], new_tokens, tokenizer.pad_token_id)
            minimal_ms[batch].append(1000 * (time.perf_counter() - start) / args.samples)
    runs: list[dict[str, Any]] = []
    for batch in batches:
        worst = args.weight_sync_steps + 3 * batch / args.per_step - 2
        runs.append(
            {
                "generation_batch_size": batch,
                "ms_per_sample": statistics.median(ms[batch]),
                "ms_per_sample_rounds": ms[batch],
                "minimal_loop_ms_per_sample": statistics.median(minimal_ms[batch]),
                "minimal_loop_ms_per_sample_rounds": minimal_ms[batch],
                "sampler_overhead_frac": statistics.median(ms[batch]) / statistics.median(minimal_ms[batch]) - 1,
                "worst_staleness_steps": worst,
                "fits_max_staleness": worst <= args.max_staleness,
            }
        )
    report = {
        **stamp(),
        "threads": 1,
        "new_tokens": preset["new_tokens"],
        "per_step": args.per_step,
        "weight_sync_steps": args.weight_sync_steps,
        "max_staleness": args.max_staleness,
        "runs": runs,
    }
    write_report(report, args.out)
    print_table([{**r, "vs_smallest": r["ms_per_sample"] / runs[0]["ms_per_sample"]} for r in runs], COLUMNS)


if __name__ == "__main__":
    main()
