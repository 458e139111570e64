"""What a weight sync costs for a LoRA student: adapters only, merged weights, or everything.

    python benchmarks/lora_sync.py --out results/lora_sync.json

The generator's snapshot of a LoRA student is a copy of the `PeftModel`, base included, made once. A weight sync
can then send:

- `adapters` (what trl_npd does): only the trainable tensors, the LoRA A/B matrices;
- `merged`: the base weights of every adapted module with the adapters folded in (W + s·BA), into a plain model,
  so that the generator samples without LoRA's extra matmuls;
- `full`: every tensor of the model (what a sync copied before adapters were told apart).

Reported per variant: milliseconds per sync (median of `--repeats`), megabytes moved, and, for the generator, the
milliseconds per sampled token with the LoRA-wrapped snapshot against the merged plain model.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from kit.cli import preset_parser
from kit.registry import presets
from kit.report import device_name, print_table, write_report
from peft import LoraConfig, get_peft_model

from trl_npd.snapshot import PolicySnapshot, inference_copy
from trl_npd.toy import build_tokenizer

PRESETS = presets("lora_sync")  # kit/registry.py: the model, LoRA's rank, the sampling batch, timed repeats
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def megabytes(tensors: list[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def every_tensor(target: torch.nn.Module, source: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, source) pairs of every tensor, by state-dict name, a tied tensor once: what a full sync copies."""
    target_state, source_state = target.state_dict(), source.state_dict()
    storage: dict[int, str] = {}
    for name, tensor in target_state.items():
        storage.setdefault(tensor.data_ptr(), name)
    return [(target_state[name], source_state[name]) for name in storage.values()]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = preset_parser(__doc__, PRESETS, default="cpu")
    parser.add_argument("--out", default="results/lora_sync.json")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    tokenizer = build_tokenizer()
    base = preset["model"].build(tokenizer, seed=0)
    student = get_peft_model(base, LoraConfig(r=preset["rank"], lora_alpha=2 * preset["rank"], target_modules=TARGETS))
    with torch.no_grad():  # non-zero B, as after some training, so merging does real work
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)

    snapshot = PolicySnapshot(student, mp.get_context("spawn"))
    everything = every_tensor(snapshot.model, student)
    merged_target = inference_copy(student).merge_and_unload()  # a plain model the generator would sample with
    merged_modules = dict(merged_target.named_modules())
    adapted = [(name, m) for name, m in student.base_model.model.named_modules() if hasattr(m, "lora_A")]

    @torch.no_grad()
    def sync_merged() -> None:
        for name, module in adapted:
            merged_modules[name].weight.copy_(module.base_layer.weight + module.get_delta_weight("default"))

    @torch.no_grad()
    def sync_full() -> None:
        for dst, src in everything:
            dst.copy_(src)

    # what each sync moves: a publish counts what it copied (the trainable tensors: the base went at creation)
    moved = {
        "adapters": (lambda: snapshot.last_publish_bytes / 2**20, lambda: snapshot.publish(student, step=1)),
        "merged": (lambda: megabytes([m.base_layer.weight for _, m in adapted]), sync_merged),
        "full": (lambda: megabytes([src for _, src in everything]), sync_full),
    }
    rows = []
    for name, (mb, sync) in moved.items():
        ms_per_sync = median_ms(sync, preset["repeats"])
        rows.append({"variant": name, "mb": mb(), "ms_per_sync": ms_per_sync})

    prompts = torch.randint(3, len(tokenizer), (preset["batch"], 16))

    @torch.no_grad()
    def sample_with(model) -> None:
        model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=preset["new_tokens"],
            min_new_tokens=preset["new_tokens"],
            do_sample=True,
            pad_token_id=tokenizer.pad_token_id,
        )

    tokens = preset["batch"] * preset["new_tokens"]
    generation = {
        "lora_snapshot_ms_per_token": median_ms(lambda: sample_with(snapshot.model), preset["repeats"]) / tokens,
        "merged_ms_per_token": median_ms(lambda: sample_with(merged_target), preset["repeats"]) / tokens,
    }
    report = {
        "preset": args.preset,
        "device": device_name(),
        "params": sum(p.numel() for p in student.parameters()),
        "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "sync": rows,
        "generation": generation,
    }
    write_report(report, args.out)
    print(f"{report['params'] / 1e6:.1f}M parameters, {report['trainable_params'] / 1e6:.2f}M trainable (LoRA)")
    print_table(rows, [("variant", "variant", ""), ("MB moved", "mb", ".1f"), ("ms/sync", "ms_per_sync", ".2f")])
    print(
        f"generator, ms per sampled token: LoRA snapshot {generation['lora_snapshot_ms_per_token']:.3f}, "
        f"merged {generation['merged_ms_per_token']:.3f}"
    )


if __name__ == "__main__":
    main()
