"""Every benchmark's presets, and the model pairs they name: one place that says what each benchmark runs, at what
size. A script takes its own with `presets("<script>")` and keeps them as its `PRESETS` (its `--preset` choices).

A preset is the benchmark's own settings, as its JSON records them; where it names a model pair, `pair` is a key of
`PAIRS`. The arenas' presets set each method's peak learning rate (`lr`): a table by method, or one rate that
`presets` gives every method the arena passes it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple


class Shape(NamedTuple):
    """A Qwen3-shaped model as `trl_npd.toy.build_model` builds it, randomly initialized (a list in JSON)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def build(self, tokenizer: Any, seed: int, vocab: int | None = None) -> Any:
        from trl_npd.toy import build_model

        return build_model(
            tokenizer,
            hidden_size=self.hidden,
            num_layers=self.layers,
            num_heads=self.heads,
            intermediate_size=self.intermediate,
            seed=seed,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            # a real model's vocabulary, so the head costs what it costs there; the tokenizer uses the first rows
            vocab_size=vocab,
        )


@dataclass(frozen=True)
class ToyPair:
    """A student (seed 1) and a teacher (seed 2) of the toy tokenizer (`trl_npd.toy`), randomly initialized."""

    student: Shape
    teacher: Shape
    vocab: int | None = None  # head rows; None: the tokenizer's

    def models(self, tokenizer: Any) -> tuple[Any, Any]:
        return self.student.build(tokenizer, seed=1, vocab=self.vocab), self.teacher.build(tokenizer, 2, self.vocab)

    def build(self, device: str | None = None) -> tuple[Any, Any, Any]:
        """(tokenizer, student, teacher), the models initialized on `device` (default: torch's)."""
        import torch

        from trl_npd.toy import build_tokenizer

        tokenizer = build_tokenizer()
        with torch.device(device) if device else contextlib.nullcontext():
            return (tokenizer, *self.models(tokenizer))


class ArenaStart(NamedTuple):
    """The real-model arena's warm-started student of one seed (benchmarks/arena_real.py, `start`): the arena preset
    whose warm start it is, and the seed."""

    preset: str
    seed: int


@dataclass(frozen=True)
class PrunedSmolLM2:
    """The real pretrained pair (benchmarks/smollm2.py): SmolLM2-135M-Instruct teaching itself pruned to
    `student_layers` of its 30 layers; with `warm_start`, the student is the real-model arena's warm-started one of
    that preset and seed instead of the pruned copy as cut."""

    student_layers: int
    warm_start: ArenaStart | None = None

    def build(self, device: str | None = None) -> tuple[Any, Any, Any]:
        """(tokenizer, student, teacher), loaded on the CPU whatever `device` says. A warm start comes from the
        arena's cache (`.cache/arena-real`, as the arena's own runs leave it), or is computed and cached there as
        the arena computes it: minutes, once."""
        import smollm2

        tokenizer, teacher = smollm2.load_teacher(smollm2.CACHE_DIR)
        if self.warm_start is None:
            return tokenizer, smollm2.pruned_student(teacher, self.student_layers), teacher
        import arena_real

        arena = arena_real.PRESETS[self.warm_start.preset]
        if arena["student"]["layers"] != self.student_layers:
            raise ValueError(
                f"arena_real's {self.warm_start.preset!r} warm start is of a {arena['student']['layers']}-layer "
                f"student, not {self.student_layers}"
            )
        student = arena_real.warm_started_student(arena, self.warm_start.seed, tokenizer, teacher, smollm2.CACHE_DIR)
        return tokenizer, student, teacher


# Qwen3's own shapes, for the GPU presets (with Qwen3's vocabulary)
QWEN3_0_6B = Shape(1024, 28, 16, 8, 128, 3072)
QWEN3_1_7B = Shape(2048, 28, 16, 8, 128, 6144)
QWEN3_4B = Shape(2560, 36, 32, 8, 128, 9728)
QWEN3_VOCAB = 151_936
CPU_TINY_STUDENT = Shape(256, 3, 4, 2, 64, 1024)  # ~3.4M parameters with the toy vocabulary

PAIRS: dict[str, ToyPair | PrunedSmolLM2] = {
    # ~3.4M-parameter student, ~13M teacher (3.9x)
    "cpu-tiny": ToyPair(CPU_TINY_STUDENT, Shape(512, 3, 8, 4, 64, 2048)),
    "qwen3-0.6b-1.7b": ToyPair(QWEN3_0_6B, QWEN3_1_7B, vocab=QWEN3_VOCAB),
    "qwen3-0.6b-4b": ToyPair(QWEN3_0_6B, QWEN3_4B, vocab=QWEN3_VOCAB),
    # the real pretrained pair of the real-model arena, its student at the CPU arena's 10 layers
    "smollm2-10-layers": PrunedSmolLM2(student_layers=10),
    # the same student warm-started as the real-model arena's seed 1 starts (the arena's tuning seed): its answers
    # end at EOS at varied lengths, where the pruned copy as cut runs every answer to the token limit
    "smollm2-10-layers-warm": PrunedSmolLM2(student_layers=10, warm_start=ArenaStart("cpu", seed=1)),
    # ~0.3M-parameter student, teacher ~4x: generation and training of comparable cost on 2 CPU cores
    "small": ToyPair(Shape(128, 2, 4, 2, 32, 512), Shape(256, 2, 4, 2, 64, 1024)),
    "small-deep-teacher": ToyPair(Shape(128, 2, 4, 2, 32, 512), Shape(256, 4, 4, 2, 64, 1024)),
    # the soak's: a few hundred thousand parameters, so that a thousand steps take minutes
    "soak": ToyPair(Shape(32, 2, 4, 2, 8, 128), Shape(64, 2, 4, 2, 16, 256)),
    # topk_jsd's random pair: cpu-tiny's student, a teacher of cpu-tiny's width with 4 heads of 128 (not 8 of 64)
    "topk-random": ToyPair(CPU_TINY_STUDENT, Shape(512, 3, 4, 2, 128, 2048)),
    # topk_jsd's pair trained briefly on the toy task, so that both are peaked
    "topk-trained": ToyPair(Shape(64, 2, 4, 2, 16, 256), Shape(128, 2, 4, 2, 32, 512)),
    # smoke tests only
    "micro": ToyPair(Shape(32, 1, 2, 1, 16, 64), Shape(64, 1, 2, 1, 32, 128)),
    "micro-4-heads": ToyPair(Shape(32, 1, 4, 2, 8, 128), Shape(64, 1, 4, 2, 16, 256)),
    "micro-twins": ToyPair(Shape(32, 1, 4, 2, 8, 128), Shape(32, 1, 4, 2, 8, 128)),
}

# ---- the toy arena (arena.py) and its pilots (arena_pilots.py) -------------------------------------------------
ARENA: dict[str, dict[str, Any]] = {
    "cpu": dict(
        digits=5,
        teacher=dict(hidden=128, layers=3, steps=1500, batch=64, lr=2e-3, seed=0, label_smoothing=0.1),
        teacher_min_acc=0.9,
        student=dict(hidden=32, layers=2),
        warmup=dict(target_acc=0.3, chunk_steps=100, max_steps=5000, batch=32, lr=2e-3, probe_prompts=256),
        # cosine decay to zero, the usual schedule for a run whose end is the result: the curves flatten over the
        # last quarter instead of stopping mid-climb (a constant rate kept GKD climbing past 2,400 steps)
        distill=dict(steps=1600, batch=16, temperature=0.9, beta=0.5, lr_scheduler="cosine"),
        # the best of lr_grid on the tuning seed, by final_acc_smoothed (docs/results/arena/tuning.json, and
        # tuning-sft-truth.json for the diagnostic)
        lr={
            "sft": 0.01,
            "sft-truth": 0.003,
            "gkd": 0.003,
            "npd": 0.003,
            "npd-ifd": 0.003,
            "npd-no-kl": 0.003,
            "npd-sync": 0.003,
            "npd-topk": 0.003,
        },
        lr_grid=[1e-3, 3e-3, 1e-2],
        tuning_seed=0,
        curve_points=16,
        final_points=3,
        eval_prompts=1024,
        train_prompts=8192,
    ),
}
# smoke test only: the cpu preset's layout, every size cut down
ARENA["micro"] = {
    **ARENA["cpu"],
    "digits": 2,
    "teacher": dict(hidden=32, layers=1, steps=30, batch=16, lr=2e-3, seed=0, label_smoothing=0.1),
    "teacher_min_acc": 0.0,
    "student": dict(hidden=16, layers=1),
    "warmup": dict(target_acc=0.0, chunk_steps=5, max_steps=5, batch=8, lr=2e-3, probe_prompts=8),
    "distill": dict(steps=4, batch=4, temperature=0.9, beta=0.5, lr_scheduler="cosine"),
    "lr": 5e-4,
    "lr_grid": [5e-4, 1e-3],
    "curve_points": 2,
    "final_points": 2,
    "eval_prompts": 16,
    "train_prompts": 64,
}

# ---- the real-model arena (arena_real.py) ------------------------------------------------------------------------
ARENA_REAL_CPU: dict[str, Any] = dict(
    student=dict(layers=10),
    # beta=0, the forward KL: a pruned student's distribution barely overlaps the teacher's, where JSD(0.5)
    # saturates at ln 2 and its gradient vanishes (measured on the micro preset: loss 0.693, gradient norm 0.007)
    distill=dict(steps=120, batch=4, temperature=0.9, beta=0.0, lr_scheduler="cosine"),
    new_tokens=40,
    # a short SFT on the teacher's greedy answers to 512 training prompts, off the clock and the same for every
    # method: the evenly pruned student is garbage (KL 12.8 nats per token), and without it 120 steps of GKD
    # at 1e-4 brought the KL to 3.2 but not one held-out answer to agreement
    warmup=dict(prompts=512, steps=100, batch=16, lr=5e-4),
    lr=3e-4,
    # every method did best at 3e-4, the grid's upper edge (docs/results/arena-real/tuning.json); 1e-3, the next
    # rate to try, has not been run: each rate costs 45-60 minutes a seed here
    lr_grid=[1e-4, 3e-4],
    # the tuning seed is also one of the compared seeds (its best runs, `--grid`'s <out>-best.json): a seed of four
    # methods costs 45-60 minutes here; picking each method's best rate flatters seed 1 for every method
    tuning_seed=1,
    curve_points=4,
    final_points=2,
    held_out_keys=40,
    held_out_wrappers=7,
    eval_batch=64,
    sampled_prompts=64,
)
ARENA_REAL: dict[str, dict[str, Any]] = {
    "cpu": ARENA_REAL_CPU,
    # the GPU preset: a deeper student, more steps (benchmarks/gpu_suite.sh)
    "gpu": {
        **ARENA_REAL_CPU,
        "student": dict(layers=15),
        "distill": {**ARENA_REAL_CPU["distill"], "steps": 300, "batch": 16},
        "new_tokens": 64,
        "warmup": dict(prompts=1024, steps=200, batch=32, lr=5e-4),
        "curve_points": 6,
        "eval_batch": 256,
        "sampled_prompts": 256,
    },
    # smoke test only: a 2-layer student, a few steps, a few questions
    "micro": {
        **ARENA_REAL_CPU,
        "student": dict(layers=2),
        "distill": {**ARENA_REAL_CPU["distill"], "steps": 2, "batch": 2},
        "new_tokens": 6,
        "warmup": dict(prompts=4, steps=2, batch=2, lr=1e-4),
        "lr": 1e-4,
        "lr_grid": [1e-4, 3e-4],
        "curve_points": 2,
        "held_out_keys": 3,
        "held_out_wrappers": 1,
        "eval_batch": 8,
        "sampled_prompts": 2,
        "train_keys": 4,
    },
}

# ---- throughput and what builds on it (throughput.py, generation_batch.py, profile_npd.py) ------------------
THROUGHPUT: dict[str, dict[str, Any]] = {
    # 64 new tokens, effective batch 8. Under 10 minutes on 2 cores.
    "cpu-tiny": dict(pair="cpu-tiny", new_tokens=64, batch=8, steps=48),
    "gpu-small": dict(pair="qwen3-0.6b-1.7b", new_tokens=256, batch=32, steps=24, bf16=True),
    "gpu-medium": dict(pair="qwen3-0.6b-4b", new_tokens=256, batch=32, steps=24, bf16=True),
    # the real pretrained pair, on the real-model arena's short questions, whose answers end at EOS at varied lengths
    "cpu-smollm2": dict(pair="smollm2-10-layers", new_tokens=40, batch=4, steps=24),
    # smoke test only: a few steps of tiny models
    "micro": dict(pair="micro", new_tokens=8, batch=2, steps=3),
}
# cpu-smollm2 with the real-model arena's warm-started student (seed 1), whose answers end early at varied lengths:
# the padding each trainer pays, and what packing saves (npd against npd-padded), on real completions
THROUGHPUT["cpu-smollm2-warm"] = {**THROUGHPUT["cpu-smollm2"], "pair": "smollm2-10-layers-warm"}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "arena": ARENA,
    "arena_real": ARENA_REAL,
    "throughput": THROUGHPUT,
    # throughput's student and new tokens; the prompts per batch, the timed batches per size, the runs of each engine
    "generation_engines": {
        "cpu-tiny": dict(
            student=PAIRS["cpu-tiny"].student,
            new_tokens=THROUGHPUT["cpu-tiny"]["new_tokens"],
            batch_sizes=[16, 64],
            batches=4,
            repeats=3,
        ),
        # smoke test only; head_dim 64, since vLLM's CPU attention refuses very small heads
        "micro": dict(student=Shape(64, 1, 1, 1, 64, 128), new_tokens=4, batch_sizes=[2], batches=1, repeats=1),
    },
    "overlap": {
        "cpu": dict(pair="small", steps=64, batch=8, new_tokens=48),
        "micro": dict(pair="micro-4-heads", steps=3, batch=2, new_tokens=4),
    },
    "ifd_cost": {
        "cpu": dict(pair="small-deep-teacher", batch=16, new_tokens=48, repeats=6),
        "micro": dict(pair="micro-4-heads", batch=2, new_tokens=4, repeats=1),
    },
    "multi_rank": {
        "cpu": dict(pair="small", batch=4, new_tokens=32, steps=32),
        "micro": dict(pair="micro-twins", batch=2, new_tokens=4, steps=3),
    },
    "lora_sync": {
        # Qwen3-shaped, ~120M parameters with the toy vocabulary; LoRA r=16 on every linear layer of the blocks
        "cpu": dict(model=Shape(768, 12, 12, 6, 64, 3072), rank=16, batch=8, new_tokens=32, repeats=5),
        "micro": dict(model=Shape(32, 1, 2, 1, 16, 128), rank=2, batch=2, new_tokens=4, repeats=2),
    },
}


def presets(benchmark: str, methods: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """`benchmark`'s presets by name, each a copy; a preset whose `lr` is one rate gets it for each of `methods`."""
    methods = list(methods)
    out = {}
    for name, preset in PRESETS[benchmark].items():
        preset = copy.deepcopy(preset)  # nested settings too: a caller's edit must not reach the registry
        if isinstance(preset.get("lr"), float):
            preset["lr"] = dict.fromkeys(methods, preset["lr"])
        out[name] = preset
    return out
