"""Quality arena: distil a teacher trained from scratch into a smaller student, on a task whose answer is checkable.

    python benchmarks/arena.py --preset cpu --seed 1 --out results/arena-cpu-1.json

Task: multiply a 5-digit number by a digit, writing a short worked trace first. For `31415*7` the completion is
`35 07 29 10 23:219905`: the partial products from the last digit up, each with the previous carry added, then the
answer. Tokens are single characters, so the model has to do the arithmetic itself.

1. Teacher: trained from scratch on ground truth until it reaches `teacher_min_acc` on held-out prompts; cached on
   disk under `--cache-dir`, keyed by its config, so only the first seed pays for it.
2. Student: a smaller model, warm-started by a short SFT on ground truth to a weak but nonzero accuracy. Its seed is
   `--seed`; every method starts from this same initialization.
3. Methods, each with the same prompts, batch and optimizer steps:
   - `sft`: TRL's `SFTTrainer` on teacher-generated completions (sampled at the on-policy methods' temperature;
     generating them is part of its wall time);
   - `gkd`: TRL's `GKDTrainer` with `lmbda=1`;
   - `npd`: `NearPolicyDistillTrainer` with its defaults;
   - `npd-no-ifd`: without Δ-IFD selection;
   - `npd-sync`: with the generator forced synchronous.
4. Measure: exact match of the final answer, greedy decoding, on `eval_prompts` held-out prompts (`acc` in [0, 1]),
   and `wall_s` of training. At a few steps the student's weights are copied (the clock excludes the copy) and
   evaluated after training, which gives a curve of (wall_s, acc) without evaluation time in the wall clock.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import random
import tempfile
import time
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from common import device_name, pyplot, save_figure, write_json
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerCallback

from trl_npd.toy import build_model

METHODS = ["sft", "gkd", "npd", "npd-no-ifd", "npd-sync"]
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        digits=5,
        teacher=dict(hidden=128, layers=3, steps=700, batch=64, lr=2e-3, seed=0),
        teacher_min_acc=0.9,
        student=dict(hidden=48, layers=2),
        warmup=dict(steps=700, batch=32, lr=2e-3),
        distill=dict(steps=500, batch=16, lr=1e-4, temperature=0.9),
        curve_points=20,
        eval_prompts=500,
        train_prompts=8192,
    ),
    # smoke test only
    "micro": dict(
        digits=2,
        teacher=dict(hidden=32, layers=1, steps=30, batch=16, lr=2e-3, seed=0),
        teacher_min_acc=0.0,
        student=dict(hidden=16, layers=1),
        warmup=dict(steps=5, batch=8, lr=2e-3),
        distill=dict(steps=4, batch=4, lr=5e-4, temperature=0.9),
        curve_points=2,
        eval_prompts=16,
        train_prompts=64,
    ),
}
TASK = "5-digit x 1-digit multiplication with a carry trace"  # for the cpu preset; micro uses 2 digits


# ---- the task ----------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}={% else %}"
    "{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, so no token hides a digit pair; `<|im_end|>` ends the answer."""
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list("0123456789*=: "))}
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


def problem(rng: random.Random, digits: int) -> tuple[str, str]:
    """(question, worked answer) for a random `digits`-digit number times a digit in 2..9."""
    a, d = rng.randrange(10**digits), rng.randrange(2, 10)
    padded = str(a).zfill(digits)
    carry, steps = 0, []
    for digit in reversed(padded):
        partial = int(digit) * d + carry
        steps.append(f"{partial:02d}")
        carry = partial // 10
    return f"{padded}*{d}", " ".join(steps) + f":{a * d}"


def answer_of(completion: str) -> str:
    return completion.rsplit(":", 1)[-1].strip()


def splits(preset: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Held-out evaluation problems and training problems, disjoint, the same for every seed."""
    rng = random.Random(12345)
    held_out: dict[str, str] = {}
    while len(held_out) < preset["eval_prompts"]:
        question, answer = problem(rng, preset["digits"])
        held_out[question] = answer
    train: dict[str, str] = {}
    while len(train) < preset["train_prompts"]:
        question, answer = problem(rng, preset["digits"])
        if question not in held_out:
            train[question] = answer
    return list(held_out.items()), list(train.items())


def conversations(pairs: list[tuple[str, str]]) -> Dataset:
    return Dataset.from_list(
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    )


def prompt_text(tokenizer: Any, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def complete(
    model: Any,
    tokenizer: Any,
    questions: list[str],
    max_new_tokens: int,
    sample: bool,
    seed: int = 0,
    temperature: float = 1.0,
) -> list[str]:
    """Completions of `questions`, greedy or sampled at `temperature`, in batches of 256."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for start in range(0, len(questions), 256):
        chunk = [prompt_text(tokenizer, q) for q in questions[start : start + 256]]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        ids = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=None,
            top_p=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    return out


def accuracy(model: Any, tokenizer: Any, held_out: list[tuple[str, str]]) -> float:
    completions = complete(model, tokenizer, [q for q, _ in held_out], max_new_tokens(held_out), sample=False)
    return sum(answer_of(c) == answer_of(a) for c, (_, a) in zip(completions, held_out, strict=True)) / len(held_out)


def max_new_tokens(pairs: list[tuple[str, str]]) -> int:
    return max(len(a) for _, a in pairs) + 2  # the answer, its end token, one spare


# ---- supervised training (teacher from scratch, student warm start) -------------------------------------------
def supervised(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], steps: int, batch: int, lr: float, seed: int
) -> None:
    """Plain next-token training on the answers (prompt tokens masked): the setup, not a compared method."""
    rng = random.Random(seed)
    encoded = []
    for question, answer in pairs:
        prompt = tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]
        full = tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        encoded.append((full, len(prompt)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    for _ in range(steps):
        rows = rng.sample(encoded, batch)
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch, width), tokenizer.pad_token_id)
        labels = torch.full((batch, width), -100)
        for i, (ids, prompt_len) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        loss = model(
            input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(), labels=labels
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()


def teacher_model(
    preset: dict[str, Any], tokenizer: Any, train: list, held_out: list, cache_dir: str
) -> tuple[Any, float, bool]:
    """The cached teacher for this config, trained first if there is none; returns (model, held-out acc, cached)."""
    config = {"task": TASK, "digits": preset["digits"], **preset["teacher"], "train_prompts": preset["train_prompts"]}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"teacher-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path)
        cached = True
    else:
        spec = preset["teacher"]
        model = build_model(tokenizer, hidden_size=spec["hidden"], num_layers=spec["layers"], seed=spec["seed"])
        supervised(model, tokenizer, train, spec["steps"], spec["batch"], spec["lr"], seed=spec["seed"])
        cached = False
    acc = accuracy(model, tokenizer, held_out)
    if acc < preset["teacher_min_acc"]:
        raise SystemExit(f"the teacher reached {acc:.1%} held-out accuracy, below {preset['teacher_min_acc']:.0%}")
    if not cached:
        model.save_pretrained(path)
        with open(os.path.join(path, "arena_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return model, acc, cached


# ---- the compared methods ------------------------------------------------------------------------------------
class Curve(TrainerCallback):
    """Training wall time from `on_train_begin`, and a copy of the student's weights at the chosen steps.

    Copying is kept off the clock, so that evaluating the copies after training costs no method any time.
    """

    def __init__(self, steps: set[int], start_offset_s: float = 0.0) -> None:
        self.steps = steps
        self.start_offset_s = start_offset_s  # work done before train() that belongs to the method (sft's data)
        self.points: list[tuple[float, int, dict[str, torch.Tensor]]] = []
        self._start = 0.0
        self._paused_s = 0.0

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start - self._paused_s + self.start_offset_s

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            elapsed = self.elapsed_s()
            copy_start = time.perf_counter()
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.points.append((elapsed, state.global_step, weights))
            self._paused_s += time.perf_counter() - copy_start


def training_args(cls: type, preset: dict[str, Any], output_dir: str, seed: int, **extra: Any) -> Any:
    spec = preset["distill"]
    return cls(
        output_dir=output_dir,
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(30, spec["steps"] // 10),
        gradient_checkpointing=False,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=seed,
        **extra,
    )


def run_method(
    method: str, preset: dict[str, Any], student_init: Any, teacher: Any, tokenizer: Any, train: list, seed: int
) -> Curve:
    from trl import SFTConfig, SFTTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer

    student = copy.deepcopy(student_init)
    spec = preset["distill"]
    n_prompts = spec["steps"] * spec["batch"]
    # every method sees the same prompts in the same order of presentation budget: the first n_prompts of a
    # seed-dependent shuffle of the training pool
    prompts = random.Random(seed).sample(train, n_prompts)
    new_tokens = max_new_tokens(train)
    curve_steps = {round(spec["steps"] * (i + 1) / preset["curve_points"]) for i in range(preset["curve_points"])}
    with tempfile.TemporaryDirectory() as output_dir:
        if method == "sft":
            start = time.perf_counter()
            completions = complete(
                teacher,
                tokenizer,
                [q for q, _ in prompts],
                new_tokens,
                sample=True,
                seed=seed,
                temperature=spec["temperature"],
            )
            data_s = time.perf_counter() - start
            dataset = Dataset.from_list(
                [
                    {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": c}]}
                    for (q, _), c in zip(prompts, completions, strict=True)
                ]
            )
            curve = Curve(curve_steps, start_offset_s=data_s)
            args = training_args(SFTConfig, preset, output_dir, seed, max_length=None, packing=False)
            trainer = SFTTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer)
        else:
            curve = Curve(curve_steps)
            dataset = conversations(prompts)
            common = dict(lmbda=1.0, max_new_tokens=new_tokens, temperature=spec["temperature"])
            if method == "gkd":
                args = training_args(GKDConfig, preset, output_dir, seed, **common)
                cls: type = GKDTrainer
            else:
                overrides = {"npd": {}, "npd-no-ifd": {"ifd_filter": False}, "npd-sync": {"generator_mode": "sync"}}
                args = training_args(NearPolicyDistillConfig, preset, output_dir, seed, **common, **overrides[method])
                cls = NearPolicyDistillTrainer
            trainer = cls(
                model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
            )
        # first, so that NPD's generator start-up (its own on_train_begin hook) is on the clock
        trainer.callback_handler.callbacks.insert(0, curve)
        trainer.train()
        # after train() returns, not at on_train_end: NPD stops its generator process in between
        curve.wall_s = curve.elapsed_s()
        curve.model = trainer.model
        if hasattr(trainer, "npd_metrics"):
            totals = trainer.npd_metrics.totals
            curve.npd = {"generated_samples": totals.generated_samples, "dropped": dict(totals.dropped)}
    return curve


def evaluate_curve(
    curve: Curve, student_init: Any, tokenizer: Any, held_out: list, init_acc: float
) -> list[list[float]]:
    points = [[0.0, init_acc]]
    model = copy.deepcopy(student_init)
    for elapsed, _, weights in curve.points:
        model.load_state_dict(weights)
        points.append([elapsed, accuracy(model, tokenizer, held_out)])
    return points


# ---- report ------------------------------------------------------------------------------------------------------
def plot(report: dict[str, Any], path: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in report["runs"]:
        xs, ys = zip(*run["curve"], strict=True)
        ax.plot(xs, [100 * y for y in ys], marker="o", label=run["method"])
    ax.axhline(100 * report["teacher_acc"], color="grey", linestyle="--", label="teacher")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(f"{report['task']}, seed {report['seed']}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def acc_at(run: dict[str, Any], wall_s: float) -> float:
    """Accuracy of the last curve point reached within `wall_s` of training (a step function, no interpolation)."""
    return max((point for point in run["curve"] if point[0] <= wall_s), key=lambda point: point[0])[1]


def summarize(paths: list[str], out: str, plot_path: str) -> None:
    """Mean and spread over seeds: accuracy and gain over the warm start at equal steps, and accuracy at equal
    wall-clock (within the training time of the `npd` and of the `npd-no-ifd` run of the same seed)."""
    import statistics

    reports = [json.load(open(path)) for path in paths]
    methods = [run["method"] for run in reports[0]["runs"]]

    def mean_spread(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), (max(values) - min(values)) / 2  # spread: half the range over seeds

    rows = []
    for method in methods:
        final, gain, wall, at_wall = [], [], [], {"npd": [], "npd-no-ifd": []}
        for report in reports:
            runs = {run["method"]: run for run in report["runs"]}
            final.append(runs[method]["acc"])
            gain.append(runs[method]["acc"] - report["student_init_acc"])
            wall.append(runs[method]["wall_s"])
            for budget in at_wall:
                if budget in runs:
                    at_wall[budget].append(acc_at(runs[method], runs[budget]["wall_s"]))
        row = {"method": method, "acc_by_seed": final, "wall_s_mean": statistics.mean(wall)}
        row["acc_mean"], row["acc_spread"] = mean_spread(final)
        row["gain_mean"], row["gain_spread"] = mean_spread(gain)
        for budget, values in at_wall.items():
            row[f"acc_at_{budget.replace('-', '_')}_wall_mean"] = statistics.mean(values) if values else None
        rows.append(row)
    summary = {
        "task": reports[0]["task"],
        "seeds": [report["seed"] for report in reports],
        "teacher_acc": [report["teacher_acc"] for report in reports],
        "student_init_acc": [report["student_init_acc"] for report in reports],
        "total_s": [report["total_s"] for report in reports],
        "methods": rows,
    }
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"{len(reports)} seeds; teacher {statistics.mean(summary['teacher_acc']):.1%}, student init "
        + " ".join(f"{a:.1%}" for a in summary["student_init_acc"])
    )
    print(
        f"{'method':11} {'acc, equal steps':>16} {'gain over init':>15} {'at npd wall':>11} "
        f"{'at no-ifd wall':>14} {'wall_s':>7}  acc by seed"
    )

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    for row in rows:
        print(
            f"{row['method']:11} {row['acc_mean']:8.1%} ± {row['acc_spread']:4.1%} "
            f"{row['gain_mean']:+7.1%} ± {row['gain_spread']:4.1%} {percent(row['acc_at_npd_wall_mean']):>11} "
            f"{percent(row['acc_at_npd_no_ifd_wall_mean']):>14} {row['wall_s_mean']:7.1f}  "
            + " ".join(f"{a:.1%}" for a in row["acc_by_seed"])
        )
    plt = pyplot()

    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 3.6), sharey=True, squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        for run in report["runs"]:
            xs, ys = zip(*run["curve"], strict=True)
            ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=run["method"])
        ax.set_title(f"seed {report['seed']}", fontsize=9)
        ax.set_xlabel("training wall-clock (s)")
    axes[0][0].set_ylabel("held-out exact match (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(summary["task"], fontsize=9)
    save_figure(fig, plot_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="results/arena-cpu-1.json")
    parser.add_argument("--plot", default=None, help="PNG of accuracy against wall-clock (default: next to --out)")
    parser.add_argument("--cache-dir", default=os.path.join(".cache", "arena"), help="where the teacher is cached")
    parser.add_argument(
        "--summarize", nargs="+", default=None, help="instead of running: combine these seeds' JSON into --out"
    )
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.out, args.plot or os.path.splitext(args.out)[0] + ".png")
        return
    preset = PRESETS[args.preset]
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()

    tokenizer = build_tokenizer()
    held_out, train = splits(preset)
    teacher, teacher_acc, cached = teacher_model(preset, tokenizer, train, held_out, args.cache_dir)
    print(f"teacher: {teacher_acc:.1%} held-out ({'cached' if cached else 'trained'})", flush=True)

    spec = preset["student"]
    student_init = build_model(tokenizer, hidden_size=spec["hidden"], num_layers=spec["layers"], seed=args.seed)
    warm = preset["warmup"]
    supervised(student_init, tokenizer, train, warm["steps"], warm["batch"], warm["lr"], seed=args.seed)
    init_acc = accuracy(student_init, tokenizer, held_out)
    print(f"student after warm start: {init_acc:.1%}", flush=True)

    runs = []
    for method in methods:
        curve = run_method(method, preset, student_init, teacher, tokenizer, train, args.seed)
        points = evaluate_curve(curve, student_init, tokenizer, held_out, init_acc)
        run = {"method": method, "acc": points[-1][1], "wall_s": curve.wall_s, "steps": preset["distill"]["steps"]}
        run["curve"] = points
        if hasattr(curve, "npd"):
            run["npd"] = curve.npd
        runs.append(run)
        print(f"{method}: {run['acc']:.1%} in {run['wall_s']:.1f} s", flush=True)

    report = {
        "task": TASK if args.preset == "cpu" else f"{preset['digits']}-digit x 1-digit multiplication",
        "preset": args.preset,
        "seed": args.seed,
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "teacher_acc": teacher_acc,
        "teacher_cached": cached,
        "student_init_acc": init_acc,
        "student_params": sum(p.numel() for p in student_init.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "eval_prompts": len(held_out),
        "runs": runs,
        "total_s": time.perf_counter() - started,
    }
    write_json(report, args.out)
    plot(report, args.plot or os.path.splitext(args.out)[0] + ".png")
    print(f"{'method':11} {'acc':>6} {'wall_s':>7}  curve (wall_s, acc)")
    for run in runs:
        curve_text = " ".join(f"({t:.0f}s {a:.0%})" for t, a in run["curve"])
        print(f"{run['method']:11} {run['acc']:6.1%} {run['wall_s']:7.1f}  {curve_text}")
    print(f"teacher {teacher_acc:.1%}, student init {init_acc:.1%}, total {report['total_s']:.0f} s")


if __name__ == "__main__":
    main()
