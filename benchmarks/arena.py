"""Quality arena: distil a teacher trained from scratch into a small student, on a task that separates the methods.

    python benchmarks/arena.py --preset cpu --seed 1 --out results/arena/seed-1.json
    python benchmarks/arena.py --preset cpu --tune --out results/arena/tuning.json   # the learning-rate grid
    python benchmarks/arena.py --preset cpu --tune --methods sft --lr-grid 3e-2 --add-to results/arena/tuning.json \
        --out results/arena/tuning.json                               # one more rate for a method at the grid's edge
    python benchmarks/arena.py --summarize results/arena/seed-*.json --out results/arena/summary.json
    python benchmarks/arena.py --records results/arena/seed-*.json --out results/arena/records.json

**Task.** Multiply a 5-digit number by a digit, writing a carry trace first: for `31415*7` the completion is
`35 07 29 10 23:219905`, the partial products from the last digit up, each with the previous carry added, then the
answer. Tokens are single characters, so the model does the arithmetic itself.

**Why it was built to separate the methods.** The teacher is trained with label smoothing
(`teacher.label_smoothing`, the usual 0.1), as many translation and language models are: its most likely token is
right (it answers every held-out prompt correctly at greedy decoding) but it keeps a little probability on every
other token, so a completion *sampled* at the distillation temperature is wrong somewhere in most cases (about 30%
are right at 0.9). SFT on teacher samples learns from those samples, mistakes included, one sample per prompt. GKD
and NPD learn the teacher's distribution, token by token, on the student's own completions: its preferred token is
right even where its samples are not, and the student is corrected in the states it actually reaches. A real
teacher sampled at temperature 0.9 over long outputs behaves the same way. The gap is one of speed: at half the
steps GKD leads SFT by about 14 points, but at the end of the decaying schedule the `cpu` preset runs, SFT has
caught up, on the 32-wide student (23x smaller than the teacher) as on a 64-wide one. The diagnostic `sft-truth`,
SFT on the clean worked answers, takes the same student to about 99%: the student is big enough for the task, and
what holds every distiller back is learning the teacher's smoothed distribution (docs/design.md §26-27).

1. **Teacher**: trained from scratch until it reaches `teacher_min_acc` on held-out prompts; cached on disk under
   `--cache-dir`, keyed by its config, so only the first run pays for it.
2. **Student**: a smaller model, warm-started by SFT on ground truth until its greedy accuracy on a slice of the
   held-out prompts reaches `warmup.target_acc`. Its seed is `--seed`; every method starts from it.
3. **Methods**, each with the same prompts, batch, optimizer steps, sampling temperature and JSD beta, and its own
   learning rate (chosen on the tuning seed, `--tune`; the JSD's gradients are smaller than cross-entropy's, so one
   shared rate would favour SFT): see `METHODS`.
4. **Measure**: exact match of the final answer on `eval_prompts` held-out prompts, greedy decoding (`acc`), and
   sampled at the training temperature at the last checkpoints (`acc_sampled`). At `curve_points` steps the
   student's weights are copied (off the clock) and evaluated after training, which gives a curve of (wall_s, acc).
   `final_acc_smoothed` averages the last `final_points` checkpoints, so one noisy checkpoint does not decide.
   `time_to_gkd_final_s` is the training wall-clock at which a run's curve, averaged the same way, first reaches
   GKD's `final_acc_smoothed` of the same seed (null: never).
5. **Per-sample records** of the NPD runs (`log_samples`: prompt, policy version, staleness when trained, Δ-IFD,
   kept or dropped and why) are written next to the JSON as `<out>.<method>.samples.jsonl`.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from datasets import Dataset
from kit.arena_kit import add_time_to_gkd_final, at_fraction, ci_text, mean_ci, preset_and_methods, time_to
from kit.cli import preset_parser
from kit.registry import presets
from kit.report import print_table, save_figure, stamp, subplots, write_report
from kit.training import TrainingClock, quiet_args, train_timed
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trl_npd.toy import build_model

# NPD's config per method, the settings the methods differ in pinned here rather than taken from the trainer's
# defaults, so that each name keeps meaning what docs/results/arena measured if the defaults change. `sft` and `gkd`
# are TRL's trainers. `npd` is NPD's defaults at the time (Δ-IFD off; the KL-bounded refresh on at 0.01 nats per
# token; the generator process; the full JSD), and each other NPD method changes one thing. The first arena
# (800 steps, docs/results/arena-800) used other names: its `npd` had Δ-IFD on and no drift refresh (design.md §25).
NPD_DEFAULTS: dict[str, Any] = {
    "ifd_filter": False,
    "max_policy_kl": 0.01,
    "generator_mode": "process",
    "teacher_top_k": None,
}
# what an NPD run's JSON records of its config, as it ran
NPD_SETTINGS = (
    "generator_mode",
    "max_policy_kl",
    "weight_sync_steps",
    "max_staleness",
    "generation_batch_size",
    "ifd_filter",
    "teacher_top_k",
)
METHODS: dict[str, dict[str, Any] | None] = {
    "sft": None,
    # a diagnostic, not a way to distil: SFT on the worked answers the teacher learned from, no sampling noise. With
    # `sft` it splits a gap to GKD into what the teacher's noisy samples cost and what the on-policy states add.
    "sft-truth": None,
    "gkd": None,
    "npd": NPD_DEFAULTS,
    "npd-ifd": {**NPD_DEFAULTS, "ifd_filter": True, "ifd_band": "tails"},
    "npd-no-kl": {**NPD_DEFAULTS, "max_policy_kl": None},
    "npd-sync": {**NPD_DEFAULTS, "generator_mode": "inline"},
    "npd-topk": {**NPD_DEFAULTS, "teacher_top_k": 10},
}
PRESETS = presets("arena", METHODS)  # kit/registry.py: teacher, warm start, distillation, evaluation


# ---- what the arena's machinery asks of a task -------------------------------------------------------------------
class ArenaTask(Protocol):
    """A task the methods are compared on: the multiplication below and its variants (arena_pilots.py), or the
    real model's healing (arena_real.py). `method_run` trains a method from a seed's start, evaluates its
    checkpoints and records the run with nothing else from the task."""

    preset: dict[str, Any]  # distill (steps, batch, temperature, beta, schedule), curve_points, final_points
    tokenizer: Any
    methods: dict[str, dict[str, Any] | None]  # each method's NPD settings; None: a TRL trainer
    final_metrics: tuple[str, ...]  # besides acc and acc_sampled: averaged over the final checkpoints too

    def new_tokens(self, pairs: list[tuple[str, str]]) -> int:
        """Room for a completion of the prompts of `pairs`: the student's rollouts, the teacher's SFT samples."""
        ...

    def evaluate(self, model: Any, final: bool) -> dict[str, float]:
        """A checkpoint's metrics, `acc` among them; `final`: one of the last `final_points`, whose `acc_sampled`
        every task gives."""
        ...


@dataclass
class Start:
    """A seed's starting point, the same for every method: the warm-started student, the teacher, the pairs the
    student trains on, and the student's metrics there (its curve's first point)."""

    student: Any
    teacher: Any
    train: list[tuple[str, str]]
    init: dict[str, float]


# ---- the task ----------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}={% else %}"
    "{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)


def character_tokenizer(extra_chars: str = "") -> PreTrainedTokenizerFast:
    """One token per character, so no token hides a digit pair; `<|im_end|>` ends the answer. `extra_chars` are
    characters a task variant adds (arena_pilots.py), after the others, so the arena's own ids do not move."""
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list("0123456789*=: " + extra_chars))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def carry_partials(padded: str, d: int) -> list[int]:
    """The trace's steps for `padded` times `d`: each digit's product from the last digit up, previous carry added."""
    carry, partials = 0, []
    for digit in reversed(padded):
        partials.append(int(digit) * d + carry)
        carry = partials[-1] // 10
    return partials


def problem(rng: random.Random, digits: int, step: Callable[[int], str] = "{:02d}".format) -> tuple[str, str]:
    """(question, worked answer) for a random `digits`-digit number times a digit in 2..9; `step` writes each
    partial of the trace (a task variant's, arena_pilots.py, may draw from `rng` for it)."""
    a, d = rng.randrange(10**digits), rng.randrange(2, 10)
    padded = str(a).zfill(digits)
    return f"{padded}*{d}", " ".join(map(step, carry_partials(padded, d))) + f":{a * d}"


def answer_of(completion: str) -> str:
    return completion.rsplit(":", 1)[-1].strip()


class Multiplication:
    """The arena's task (the module docstring): its tokenizer, and its held-out and training problems, disjoint and
    the same for every seed. The variants of arena_pilots.py subclass it: another `problem`, characters the
    tokenizer adds (`extra_chars`), answer positions supervised training skips (`untrained`), another room for
    completions (`new_tokens`), other pairs for the student (`student_pairs`)."""

    methods = METHODS
    final_metrics: tuple[str, ...] = ()
    extra_chars = ""
    untrained: Callable[[str], list[int]] | None = None

    def __init__(self, preset: dict[str, Any]) -> None:
        self.preset = preset
        self.digits = preset["digits"]
        self.tokenizer = character_tokenizer(self.extra_chars)
        self.held_out, self.train = self.splits()

    @property
    def name(self) -> str:
        return f"{self.digits}-digit x 1-digit multiplication with a carry trace"

    def problem(self, rng: random.Random) -> tuple[str, str]:
        return problem(rng, self.digits)

    def splits(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Held-out evaluation problems and training problems, disjoint, the same for every seed."""
        rng = random.Random(12345)
        held_out: dict[str, str] = {}
        while len(held_out) < self.preset["eval_prompts"]:
            question, answer = self.problem(rng)
            held_out[question] = answer
        train: dict[str, str] = {}
        while len(train) < self.preset["train_prompts"]:
            question, answer = self.problem(rng)
            if question not in held_out:
                train[question] = answer
        return list(held_out.items()), list(train.items())

    def student_pairs(self) -> list[tuple[str, str]]:
        """What the student warms up on, and the methods train on: the teacher's own training problems."""
        return self.train

    def new_tokens(self, pairs: list[tuple[str, str]]) -> int:
        return max(len(a) for _, a in pairs) + 2  # the answer, its end token, one spare

    def evaluate(self, model: Any, final: bool) -> dict[str, float]:
        point = {"acc": accuracy(model, self, self.held_out)}
        if final:
            point["acc_sampled"] = accuracy(model, self, self.held_out, self.preset["distill"]["temperature"])
        return point


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    """The prompt's ids in the tokenizer's chat template, ready for the answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_ids(
    model: Any, tokenizer: Any, questions: list[str], new_tokens: int, batch: int, temperature: float | None, seed: int
) -> list[list[int]]:
    """Completion ids of `questions`, each cut after its first end token: greedy when `temperature` is None, else
    sampled at it; `batch` prompts at a time, left-padded."""
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(questions), batch):
            rows = [chat_ids(tokenizer, q) for q in questions[start : start + batch]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
            sequences = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=new_tokens,
                do_sample=temperature is not None,
                temperature=temperature,
                top_k=None,
                top_p=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for completion in sequences[:, width:].tolist():
                end = completion.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in completion else None
                out.append(completion[:end])
    model.train(was_training)
    return out


def complete(
    model: Any, tokenizer: Any, questions: list[str], new_tokens: int, temperature: float | None, seed: int = 0
) -> list[str]:
    """Completions of `questions`: greedy when `temperature` is None, else sampled at it; in batches of 512."""
    # kept from when this padded with the tokenizer: the trainers built after the first call saw it left-padding
    tokenizer.padding_side = "left"
    ids = generate_ids(model, tokenizer, questions, new_tokens, 512, temperature, seed)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def accuracy(model: Any, task: Multiplication, pairs: list, temperature: float | None = None) -> float:
    """Exact match of the answer on `pairs`: greedy, or sampled at `temperature`."""
    completions = complete(model, task.tokenizer, [q for q, _ in pairs], task.new_tokens(pairs), temperature)
    return sum(answer_of(c) == answer_of(a) for c, (_, a) in zip(completions, pairs, strict=True)) / len(pairs)


# ---- supervised training (teacher from scratch, student warm start) -------------------------------------------
def encode(tokenizer: Any, question: str, answer: str) -> tuple[list[int], int]:
    """Prompt and completion ids, and the prompt's length (its tokens are not trained on)."""
    prompt = chat_ids(tokenizer, question)
    completion = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return [*prompt, *completion, tokenizer.eos_token_id], len(prompt)


def supervised(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    label_smoothing: float = 0.0,
    untrained: Callable[[str], list[int]] | None = None,
) -> None:
    """Plain next-token training on the answers (the setup, not a compared method), one-cycle learning rate.
    `untrained(answer)` names positions of the answer not to train on (a task variant's, arena_pilots.py); one
    character is one token, so an answer's position is its completion token's."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    for _ in range(steps):
        chosen = rng.sample(pairs, batch)
        rows = [encode(tokenizer, q, a) for q, a in chosen]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch, width), tokenizer.pad_token_id)
        labels = torch.full((batch, width), -100)
        # from the lengths, not from the pad id: a tokenizer whose pad token is its end token (SmolLM2's) has it
        # inside every chat-template prompt, where it must be attended to
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, ((ids, prompt_len), (_, answer)) in enumerate(zip(rows, chosen, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            for position in untrained(answer) if untrained else ():
                labels[i, prompt_len + position] = -100
        device = model.device
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            labels[:, 1:].flatten().to(device),
            ignore_index=-100,
            label_smoothing=label_smoothing,
        ).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()


def teacher_model(task: Multiplication, cache_dir: str) -> tuple[Any, dict[str, float], bool]:
    """The cached teacher for this config, trained first if there is none; returns (model, held-out acc, cached)."""
    preset = task.preset
    config = {
        "task": task.name,
        "digits": preset["digits"],
        **preset["teacher"],
        "train_prompts": preset["train_prompts"],
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"teacher-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        from transformers import AutoModelForCausalLM

        model, cached = AutoModelForCausalLM.from_pretrained(path), True
    else:
        spec = preset["teacher"]
        model = build_model(task.tokenizer, hidden_size=spec["hidden"], num_layers=spec["layers"], seed=spec["seed"])
        supervised(
            model,
            task.tokenizer,
            task.train,
            spec["steps"],
            spec["batch"],
            spec["lr"],
            spec["seed"],
            spec["label_smoothing"],
            task.untrained,
        )
        cached = False
    acc = {
        "greedy": accuracy(model, task, task.held_out),
        "sampled": accuracy(model, task, task.held_out, preset["distill"]["temperature"]),
    }
    if acc["greedy"] < preset["teacher_min_acc"]:
        raise SystemExit(f"the teacher reached {acc['greedy']:.1%} held-out, below {preset['teacher_min_acc']:.0%}")
    if not cached:
        model.save_pretrained(path)
        with open(os.path.join(path, "arena_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return model, acc, cached


def student_params(preset: dict[str, Any]) -> int:
    """The preset's student's parameter count, without training it."""
    spec = preset["student"]
    model = build_model(character_tokenizer(), hidden_size=spec["hidden"], num_layers=spec["layers"], seed=0)
    return sum(p.numel() for p in model.parameters())


def warm_student(task: Multiplication, train: list, seed: int) -> tuple[Any, int]:
    """The seed's student, trained on clean ground truth until its greedy accuracy on a slice of the held-out
    prompts reaches the target: a learning curve of this task has sudden jumps, so a fixed number of steps would
    start the seeds at very different levels. Returns (model, warm-up steps)."""
    spec, warm = task.preset["student"], task.preset["warmup"]
    model = build_model(task.tokenizer, hidden_size=spec["hidden"], num_layers=spec["layers"], seed=seed)
    probe = task.held_out[: warm["probe_prompts"]]
    steps = 0
    while steps < warm["max_steps"]:
        chunk_seed = seed * 100_003 + steps
        supervised(
            model,
            task.tokenizer,
            train,
            warm["chunk_steps"],
            warm["batch"],
            warm["lr"],
            chunk_seed,
            0.0,
            task.untrained,
        )
        steps += warm["chunk_steps"]
        if accuracy(model, task, probe) >= warm["target_acc"]:
            break
    return model, steps


# ---- the compared methods ------------------------------------------------------------------------------------
class Curve(TrainingClock):
    """The training clock, and a copy of the student's weights at the chosen steps.

    Copying is kept off the clock, so that evaluating the copies after training costs no method any time.
    """

    def __init__(self, steps: set[int], offset_s: float = 0.0) -> None:
        super().__init__(offset_s)
        self.steps = steps
        self.points: list[tuple[float, int, dict[str, torch.Tensor]]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            elapsed = self.elapsed_s()
            with self.paused():
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                self.points.append((elapsed, state.global_step, weights))


def training_args(cls: type, preset: dict[str, Any], output_dir: str, seed: int, lr: float, **extra: Any) -> Any:
    spec = preset["distill"]
    return quiet_args(
        cls,
        output_dir,
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        learning_rate=lr,
        lr_scheduler_type=spec["lr_scheduler"],
        warmup_steps=min(30, spec["steps"] // 10),
        gradient_checkpointing=False,
        seed=seed,
        **extra,
    )


def sft_completions(
    method: str, teacher: Any, tokenizer: Any, prompts: list, new_tokens: int, temperature: float, seed: int
) -> list[str]:
    """`sft` trains on one teacher completion per prompt, sampled at the distillation temperature; `sft-truth` on
    the worked answers the teacher was trained on."""
    if method == "sft-truth":
        return [answer for _, answer in prompts]
    return complete(teacher, tokenizer, [q for q, _ in prompts], new_tokens, temperature, seed)


def run_method(
    task: ArenaTask, method: str, lr: float, start: Start, seed: int, samples_path: str | None
) -> tuple[Curve, dict[str, Any]]:
    """Train a copy of the warm student with `method` (one of `task.methods`); returns its curve and what the run
    reported. `method="distillation"` is TRL's DistillationTrainer on the prompts alone, `"npd-distillation"` the
    same script after the one-line swap to NPD's drop-in for it."""
    from trl import DistillationConfig, DistillationTrainer, SFTConfig, SFTTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trl_npd import (
        NearPolicyDistillConfig,
        NearPolicyDistillTrainer,
        NPDDistillationConfig,
        NPDDistillationTrainer,
    )

    student, teacher, tokenizer, preset = copy.deepcopy(start.student), start.teacher, task.tokenizer, task.preset
    spec = preset["distill"]
    # every method gets the same prompts, steps x batch of them: seed-dependent shuffles of the training pool, one
    # after the other (a prompt repeats only once the pool is used up). Each trainer then draws them in its own
    # seeded order (TRL's dataloaders, NPD's prompt stream).
    rng, prompts = random.Random(seed), []
    while len(prompts) < spec["steps"] * spec["batch"]:
        prompts += rng.sample(start.train, len(start.train))
    prompts = prompts[: spec["steps"] * spec["batch"]]
    new_tokens = task.new_tokens(start.train)
    points = preset["curve_points"]
    curve_steps = {round(spec["steps"] * (i + 1) / points) for i in range(points)}
    # the NPD methods log the npd/ metrics, policy_kl among them (the others log nothing: `quiet_args`)
    npd_logging = dict(logging_steps=max(1, spec["steps"] // 50), log_samples=samples_path is not None)
    sampling = dict(temperature=spec["temperature"], beta=spec["beta"])
    report: dict[str, Any] = {}
    offset_s = 0.0
    with tempfile.TemporaryDirectory() as output_dir:
        if method in ("sft", "sft-truth"):
            began = time.perf_counter()
            completions = sft_completions(method, teacher, tokenizer, prompts, new_tokens, spec["temperature"], seed)
            offset_s = time.perf_counter() - began
            dataset = Dataset.from_list(
                [
                    {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": c}]}
                    for (q, _), c in zip(prompts, completions, strict=True)
                ]
            )
            config, trainer_cls, settings = SFTConfig, SFTTrainer, dict(max_length=None, packing=False)
        # GKD's settings in DistillationConfig's names (lmbda=1: prompts only). Unlike GKD, DistillationTrainer also
        # applies the temperature to the divergence, not only to the sampling: that is its objective, kept as is
        elif method in ("distillation", "npd-distillation"):
            dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q, _ in prompts])
            config, trainer_cls = DistillationConfig, DistillationTrainer
            settings = dict(max_completion_length=new_tokens, disable_dropout=True, **sampling)
            if method == "npd-distillation":
                config, trainer_cls, settings = NPDDistillationConfig, NPDDistillationTrainer, settings | npd_logging
        else:
            dataset = Dataset.from_list(
                [
                    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                    for q, a in prompts
                ]
            )
            config, trainer_cls = GKDConfig, GKDTrainer
            settings = dict(lmbda=1.0, max_new_tokens=new_tokens, **sampling)
            if method != "gkd":
                config, trainer_cls = NearPolicyDistillConfig, NearPolicyDistillTrainer
                settings = settings | npd_logging | task.methods[method]
        curve = Curve(curve_steps, offset_s)
        args = training_args(config, preset, output_dir, seed, lr, **settings)
        teacher_arg = {} if trainer_cls is SFTTrainer else {"teacher_model": teacher}
        trainer = trainer_cls(
            model=student, args=args, train_dataset=dataset, processing_class=tokenizer, **teacher_arg
        )
        train_timed(trainer, curve)
        if hasattr(trainer, "npd_metrics"):
            totals = trainer.npd_metrics.totals
            report["npd"] = {
                "generated_samples": totals.generated_samples,
                "trained_samples": totals.consumed_samples,
                "dropped": dict(totals.dropped),
                "weight_syncs": dict(totals.weight_syncs),
                "policy_kl": [
                    entry["npd/policy_kl"] for entry in trainer.state.log_history if "npd/policy_kl" in entry
                ],
                # the settings that ran, defaults resolved (the generator's mode follows the hardware)
                "config": {key: getattr(trainer.args, key) for key in NPD_SETTINGS},
                # every trained sample: [staleness when trained, mean k3 drift per token, trained tokens]
                "sample_drift": [list(record) for record in totals.sample_drift],
            }
            if samples_path is not None:
                shutil.copyfile(os.path.join(output_dir, "npd_samples.jsonl"), samples_path)
    return curve, report


def evaluate_curve(task: ArenaTask, curve: Curve, start: Start) -> list[dict[str, float]]:
    """The start's metrics, then each checkpoint's, the last `final_points` as final ones (`task.evaluate`)."""
    points = [{"step": 0, "wall_s": 0.0, **start.init}]
    model = copy.deepcopy(start.student)
    final = {step for _, step, _ in curve.points[-task.preset["final_points"] :]}
    for elapsed, step, weights in curve.points:
        model.load_state_dict(weights)
        points.append({"step": step, "wall_s": elapsed, **task.evaluate(model, final=step in final)})
    return points


# ---- one seed ----------------------------------------------------------------------------------------------------
def method_run(task: ArenaTask, method: str, lr: float, start: Start, seed: int, out: str | None) -> dict[str, Any]:
    """One method's run from the seed's start, trained and its checkpoints evaluated, as a seed's JSON holds it: its
    curve, and its final accuracy averaged over the last `final_points` checkpoints, greedy and sampled, and so
    each of the task's `final_metrics`. An NPD method's per-sample records go next to `out` (none without it)."""
    samples_path = None
    if task.methods[method] is not None and out:
        samples_path = f"{os.path.splitext(out)[0]}.{method}.samples.jsonl"
    curve, reported = run_method(task, method, lr, start, seed, samples_path)
    points = evaluate_curve(task, curve, start)
    final = points[-task.preset["final_points"] :]
    finals = {
        f"final_{m}_smoothed": statistics.mean(p[m] for p in final)
        for m in ("acc", "acc_sampled", *task.final_metrics)
    }
    return {
        "method": method,
        "lr": lr,
        "steps": task.preset["distill"]["steps"],
        "wall_s": curve.wall_s,
        "acc": points[-1]["acc"],
        **finals,
        "curve": points,
        **reported,
    }


def run_seed(
    task: Multiplication,
    seed: int,
    runs: list[tuple[str, float]],
    cache_dir: str,
    out: str | None,
    about_start: Callable[[Start], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A seed's report: the cached teacher, the seed's warm-started student, and each (method, learning rate) of
    `runs` trained from it, with its time to GKD's final accuracy. `about_start(start)`: the fields a task variant
    adds about the start before the methods run (arena_pilots.py: how often the teacher's samples repair)."""
    started = time.perf_counter()
    teacher, teacher_acc, cached = teacher_model(task, cache_dir)
    print(f"teacher: {teacher_acc['greedy']:.1%} greedy, {teacher_acc['sampled']:.1%} sampled", flush=True)
    train = task.student_pairs()
    student_init, warm_steps = warm_student(task, train, seed)
    start = Start(student_init, teacher, train, {"acc": accuracy(student_init, task, task.held_out)})
    print(f"student after {warm_steps} warm-up steps: {start.init['acc']:.1%}", flush=True)
    about = about_start(start) if about_start else {}
    records = []
    for method, lr in runs:
        records.append(run := method_run(task, method, lr, start, seed, out))
        final, last, wall_s = run["final_acc_smoothed"], run["acc"], run["wall_s"]
        print(f"{method} at {lr:g}: {final:.1%} (last {last:.1%}) in {wall_s:.1f} s", flush=True)
    add_time_to_gkd_final(records, task.preset["final_points"])
    return {
        "task": task.name,
        "seed": seed,
        **stamp(),
        "teacher_acc": teacher_acc["greedy"],
        "teacher_acc_sampled": teacher_acc["sampled"],
        "teacher_cached": cached,
        **about,
        "student_init_acc": start.init["acc"],
        "student_warmup_steps": warm_steps,
        "student_params": sum(p.numel() for p in student_init.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "eval_prompts": len(task.held_out),
        "distill": task.preset["distill"],
        "final_points": task.preset["final_points"],
        "runs": records,
        "total_s": time.perf_counter() - started,
    }


def added_to(existing: dict[str, Any], report: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """`existing` with `report`'s runs added: the same seed, so the same teacher and warm-started student, and their
    time to quality measured against the existing GKD run's final accuracy."""
    for key in ("task", "seed", "student_init_acc", "teacher_acc", "eval_prompts"):
        if existing[key] != report[key]:
            raise SystemExit(f"--add-to: {key} differs ({existing[key]} there, {report[key]} here): not the same seed")
    have = {run["method"] for run in existing["runs"]}
    if clash := have & {run["method"] for run in report["runs"]}:
        raise SystemExit(f"--add-to: the report already has {sorted(clash)}")
    gkd = next(run for run in existing["runs"] if run["method"] == "gkd")
    for run in report["runs"]:
        run["time_to_gkd_final_s"] = time_to(run["curve"], preset["final_points"], gkd["final_acc_smoothed"])
        run["added"] = {"date": report["date"], "device": report["device"]}
    return {**existing, "runs": existing["runs"] + report["runs"], "total_s": existing["total_s"] + report["total_s"]}


# a seed's table: each run's row (arena_pilots.py adds the accuracy at half the steps)
RUN_COLUMNS = [
    ("method", "method", ""),
    ("lr", "lr", ".0e"),
    ("final (smoothed)", "final_acc_smoothed", ".1%"),
    ("sampled", "final_acc_sampled_smoothed", ".1%"),
    ("wall_s", "wall_s", ".1f"),
    ("to gkd", "time_to_gkd_final_s", ".0f"),
]


def print_seed(report: dict[str, Any], columns: list[tuple[str, str, str]] = RUN_COLUMNS) -> None:
    print(f"{report['task']}, seed {report['seed']}")
    print_table(report["runs"], columns)
    init, total_s = report["student_init_acc"], report["total_s"]
    print(f"teacher {report['teacher_acc']:.1%}, student init {init:.1%}, total {total_s:.0f} s")


def accuracy_curve(run: dict[str, Any]) -> tuple[list[float], list[float]]:
    """A run's curve to plot: (training wall-clock, greedy accuracy in %) at each checkpoint."""
    return [p["wall_s"] for p in run["curve"]], [100 * p["acc"] for p in run["curve"]]


def plot_seed(report: dict[str, Any], path: str) -> None:
    fig, ax = subplots(figsize=(6.5, 4))
    for run in report["runs"]:
        ax.plot(*accuracy_curve(run), marker="o", label=run["method"])
    ax.axhline(100 * report["teacher_acc"], color="grey", linestyle="--", label="teacher")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("held-out exact match, greedy (%)")
    ax.set_title(f"{report['task']}, seed {report['seed']}", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


# ---- learning-rate tuning ------------------------------------------------------------------------------------------
def tune(preset: dict[str, Any], methods: list[str], args: Any) -> None:
    """Each method at each rate of the grid, on the tuning seed (never one of the compared seeds); the best
    rate by `final_acc_smoothed` goes in the preset's `lr` table. With `--add-to`, the rates run here extend an
    earlier grid, for all of its methods or only those whose best rate is at its edge, and each method's best is
    chosen over all the rates it ran."""
    seed = preset["tuning_seed"]
    grid: dict[str, dict[str, float]] = {}
    reports = []
    if args.add_to:
        earlier = json.load(open(args.add_to))
        if "grid" not in earlier:
            raise SystemExit(f"--tune --add-to: {args.add_to} is not a learning-rate grid (--tune's JSON)")
        grid, reports = earlier["grid"], earlier["runs"]
        if earlier["seed"] != seed or any(report["distill"] != preset["distill"] for report in reports):
            raise SystemExit("--tune --add-to: that grid ran another seed or another setup (steps, schedule)")
        if {report["student_params"] for report in reports} != {student_params(preset)}:
            raise SystemExit("--tune --add-to: that grid tuned another student (its size differs from the preset's)")
        # a subset of its methods (typically those whose best rate is at the grid's edge), never new ones: a
        # method's rates all come from one grid on one seed
        if new := set(methods) - set(grid):
            raise SystemExit(f"--tune --add-to: that grid has no {sorted(new)}; it has methods {sorted(grid)}")
        if ran := {f"{lr:g}" for lr in preset["lr_grid"]} & {rate for method in methods for rate in grid[method]}:
            raise SystemExit(f"--tune --add-to: that grid already has the rates {sorted(ran)}")
    for lr in preset["lr_grid"]:
        report = run_seed(Multiplication(preset), seed, [(method, lr) for method in methods], args.cache_dir, None)
        if reports and report["student_init_acc"] != reports[0]["student_init_acc"]:
            raise SystemExit("--tune: the warm-started student differs from the grid's first one; not the same setup")
        reports.append(report)
        for run in report["runs"]:
            grid.setdefault(run["method"], {})[f"{lr:g}"] = run["final_acc_smoothed"]
    best = {method: float(max(rates, key=rates.get)) for method, rates in grid.items()}
    write_report({"seed": seed, "grid": grid, "best_lr": best, "runs": reports}, args.out)
    rates_run = [f"{lr:g}" for lr in sorted({float(lr) for rates in grid.values() for lr in rates})]
    columns = [("method", "method", ""), *((rate, rate, ".1%") for rate in rates_run), ("best", "best", "g")]
    print_table([{"method": method, **rates, "best": best[method]} for method, rates in grid.items()], columns)


# ---- summary over seeds ------------------------------------------------------------------------------------------
def summary_row(mine: list[dict], runs: list[dict[str, dict]], reports: list[dict]) -> dict[str, Any]:
    """A method's row of the summary from its run on each seed (`mine`), paired with the same seed's GKD run and,
    where every seed ran it, SFT run (`runs`: each seed's runs by method)."""
    gkd = [r["gkd"] for r in runs]

    def paired(key: str, other: list[dict] | None = None) -> dict[str, float]:
        """Mean and CI over the seeds of the run's `key`, less `other`'s on the same seed."""
        values = [run[key] for run in mine]
        if other is not None:
            values = [value - run[key] for value, run in zip(values, other, strict=True)]
        return mean_ci(values)

    def at(fraction: float, seeds: list[dict]) -> list[float]:
        return [
            at_fraction(run["curve"], rep["final_points"], fraction) for run, rep in zip(seeds, reports, strict=True)
        ]

    final = [run["final_acc_smoothed"] for run in mine]
    return {
        "method": mine[0]["method"],
        "lr": mine[0]["lr"],
        "final_acc_smoothed": paired("final_acc_smoothed"),
        "final_acc_sampled_smoothed": paired("final_acc_sampled_smoothed"),
        "gain_over_init": mean_ci([a - rep["student_init_acc"] for a, rep in zip(final, reports, strict=True)]),
        "minus_gkd": paired("final_acc_smoothed", gkd),
        "minus_gkd_sampled": paired("final_acc_sampled_smoothed", gkd),
        "minus_sft": paired("final_acc_smoothed", [r["sft"] for r in runs]) if "sft" in runs[0] else None,
        # at equal steps along the way: the smoothed curve at half the steps, paired with GKD's there
        "half_steps_minus_gkd": mean_ci([a - b for a, b in zip(at(0.5, mine), at(0.5, gkd), strict=True)]),
        # has the curve flattened: the smoothed gain over the last quarter of the steps
        "last_quarter_gain": mean_ci([a - b for a, b in zip(final, at(0.75, mine), strict=True)]),
        "wall_s": paired("wall_s"),
        "time_to_gkd_final_s": [run["time_to_gkd_final_s"] for run in mine],
        "time_to_gkd_final_vs_gkd_wall": [
            None if (t := run["time_to_gkd_final_s"]) is None else t / g["wall_s"]
            for run, g in zip(mine, gkd, strict=True)
        ],
    }


def summarize(paths: list[str], out: str, plot_path: str, only: list[str] | None = None) -> dict[str, Any]:
    """Paired per-seed differences to GKD and SFT (mean and 95% CI; to SFT where every seed ran it), and time to
    GKD's final accuracy, over the seeds; `only`: these methods of each seed."""
    reports = sorted((json.load(open(path)) for path in paths), key=lambda r: r["seed"])
    for report in reports if only else []:
        report["runs"] = [run for run in report["runs"] if run["method"] in only]
    methods = [run["method"] for run in reports[0]["runs"]]
    for report in reports:
        if len(seen := [run["method"] for run in report["runs"]]) != len(set(seen)):
            raise SystemExit(f"seed {report['seed']} ran a method more than once ({seen}): nothing to pair it with")
    for report in reports[1:]:
        if differ := set(methods) ^ {run["method"] for run in report["runs"]}:
            raise SystemExit(f"the seeds ran different methods: {sorted(differ)} are not in all of them")
    if len(seeds := [report["seed"] for report in reports]) != len(set(seeds)):
        raise SystemExit(f"a seed given more than once ({seeds}): each seed is paired once")
    if "gkd" not in methods:
        raise SystemExit(f"the summary pairs every method with gkd; these seeds ran only {methods}")
    runs = [{run["method"]: run for run in report["runs"]} for report in reports]  # per seed, by method
    rows = [summary_row([r[method] for r in runs], runs, reports) for method in methods]
    summary = {
        "task": reports[0]["task"],
        "seeds": [report["seed"] for report in reports],
        "eval_prompts": reports[0]["eval_prompts"],
        "teacher_acc": reports[0]["teacher_acc"],
        "student_init_acc": [report["student_init_acc"] for report in reports],
        "total_s": [report["total_s"] for report in reports],
        "methods": rows,
    }
    write_report(summary, out)
    print_summary(summary)
    plot_summary(reports, plot_path)
    return summary


def summarize_records(paths: list[str], out: str) -> None:
    """What the NPD runs trained on, from their per-sample records next to each seed's JSON: samples trained and
    dropped by reason, the staleness of the trained ones, and Δ-IFD where it was scored (the dropped ones' sign
    shows a band that cuts by sign)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        stem = os.path.splitext(path)[0]
        for run in json.load(open(path))["runs"]:
            records_path = f"{stem}.{run['method']}.samples.jsonl"
            if not os.path.exists(records_path):
                continue
            row = rows.setdefault(
                run["method"],
                {"seeds": 0, "fates": collections.Counter(), "staleness": [], "delta_kept": [], "delta_dropped": []},
            )
            row["seeds"] += 1
            with open(records_path) as f:
                for line in f:
                    record = json.loads(line)
                    trained = record["fate"] == "trained"
                    row["fates"]["trained" if trained else f"dropped: {record['reason']}"] += 1
                    if trained:
                        row["staleness"].append(record["staleness"])
                    if record["ifd_delta"] is not None:
                        row["delta_kept" if trained else "delta_dropped"].append(record["ifd_delta"])

    def quantiles(values: list[float]) -> dict[str, float] | None:
        if len(values) < 2:
            return None
        q = statistics.quantiles(values, n=20)
        return {"p5": q[0], "median": statistics.median(values), "p95": q[-1]}

    report = {}
    for method, row in rows.items():
        total = sum(row["fates"].values())
        dropped_delta = row["delta_dropped"]
        report[method] = {
            "seeds": row["seeds"],
            "records": total,
            "fates": dict(row["fates"]),
            "dropped_frac": 1 - row["fates"]["trained"] / total if total else 0.0,
            "staleness_mean": statistics.mean(row["staleness"]) if row["staleness"] else None,
            "staleness_max": max(row["staleness"], default=None),
            "ifd_delta_trained": quantiles(row["delta_kept"]),
            "ifd_delta_dropped": quantiles(dropped_delta),
            "ifd_dropped_below_zero_frac": (
                sum(d < 0 for d in dropped_delta) / len(dropped_delta) if dropped_delta else None
            ),
        }
    write_report({"seeds_files": paths, "methods": report}, out)
    table = []
    for method, r in report.items():
        kept = r["ifd_delta_trained"]
        delta = None if kept is None else f"{kept['p5']:+.2f}/{kept['median']:+.2f}/{kept['p95']:+.2f}"
        table.append({**r, "method": method, "delta_trained": delta, "fates": str(r["fates"])})
    print_table(
        table,
        [
            ("method", "method", ""),
            ("records", "records", "d"),
            ("dropped", "dropped_frac", ".1%"),
            ("stale mean", "staleness_mean", ".2f"),
            ("max", "staleness_max", ""),
            ("Δ trained p5/med/p95", "delta_trained", ""),
            ("dropped Δ<0", "ifd_dropped_below_zero_frac", ".0%"),
            ("fates", "fates", ""),
        ],
    )


# the summary's paired differences: (header, field)
SUMMARY_CIS = [
    ("minus gkd [95% CI]", "minus_gkd"),
    ("minus sft [95% CI]", "minus_sft"),
    ("sampled - gkd", "minus_gkd_sampled"),
    ("half steps - gkd", "half_steps_minus_gkd"),
    ("last quarter gain", "last_quarter_gain"),
]


def print_summary(summary: dict[str, Any]) -> None:
    inits = " ".join(f"{a:.1%}" for a in summary["student_init_acc"])
    seeds, prompts, teacher = summary["seeds"], summary["eval_prompts"], summary["teacher_acc"]
    print(f"{len(seeds)} seeds {seeds}; {prompts} held-out prompts; teacher {teacher:.1%}; student init {inits}")
    rows = []
    for row in summary["methods"]:
        reached = [t for t in row["time_to_gkd_final_vs_gkd_wall"] if t is not None]
        rows.append(
            {
                **{key: ci_text(row[key]) for _, key in SUMMARY_CIS},
                "method": row["method"],
                "final": row["final_acc_smoothed"]["mean"],
                "wall_s": row["wall_s"]["mean"],
                "per_seed": " ".join("-" if t is None else f"{t:.0f}" for t in row["time_to_gkd_final_s"]),
                "vs_gkd_wall": statistics.median(reached) if reached else None,
            }
        )
    print_table(rows, [("method", "method", ""), ("final acc", "final", ".1%"), *((h, k, "") for h, k in SUMMARY_CIS)])
    print("\ntime to gkd final")
    per_seed = ("per seed (s; - = not reached)", "per_seed", "")
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("wall_s (mean)", "wall_s", ".1f"),
            per_seed,
            ("median / gkd wall", "vs_gkd_wall", ".2f"),
        ],
    )


def plot_summary(reports: list[dict[str, Any]], path: str) -> None:
    fig, axes = subplots(1, len(reports), figsize=(3.6 * len(reports), 3.4), sharey=True, squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        for run in report["runs"]:
            ax.plot(*accuracy_curve(run), label=run["method"])
        ax.set_title(f"seed {report['seed']}", fontsize=9)
        ax.set_xlabel("training wall-clock (s)")
    axes[0][0].set_ylabel("held-out exact match, greedy (%)")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(reports[0]["task"], fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = preset_parser(__doc__, PRESETS, default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="results/arena/seed-1.json")
    parser.add_argument("--cache-dir", default=os.path.join(".cache", "arena"), help="where the teacher is cached")
    parser.add_argument("--tune", action="store_true", help="run the learning-rate grid on the tuning seed")
    parser.add_argument("--lr-grid", default=None, help="with --tune: these rates (comma-separated), not the preset's")
    parser.add_argument("--summarize", nargs="+", default=None, help="combine these seeds' JSON into --out")
    parser.add_argument(
        "--add-to",
        default=None,
        help="a seed's JSON: run --methods on the same seed and write that report with their runs added to --out; "
        "with --tune, an earlier grid's JSON that the rates run here extend",
    )
    parser.add_argument(
        "--records", nargs="+", default=None, help="summarize the NPD runs' per-sample records of these seeds' JSON"
    )
    args = parser.parse_args()
    preset, methods = preset_and_methods(parser, args, PRESETS, METHODS)
    plot_path = os.path.splitext(args.out)[0] + ".png"  # accuracy against wall-clock
    if args.summarize:
        summarize(args.summarize, args.out, plot_path)
        return
    if args.records:
        summarize_records(args.records, args.out)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    if args.tune:
        tune(preset, methods, args)
        return
    if args.seed == preset["tuning_seed"]:
        raise SystemExit(f"seed {args.seed} is the tuning seed; compare on the others")
    runs = [(method, preset["lr"][method]) for method in methods]
    report = run_seed(Multiplication(preset), args.seed, runs, args.cache_dir, args.out)
    if args.add_to:
        report = added_to(json.load(open(args.add_to)), report, preset)
    write_report(report, args.out)
    plot_seed(report, plot_path)
    print_seed(report)


if __name__ == "__main__":
    main()
