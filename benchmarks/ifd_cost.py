"""What Δ-IFD costs the generator: wall time per sample with and without scoring and selection.

    python benchmarks/ifd_cost.py --out results/ifd_cost.json

The generator's own loop step (`generator.generate_batch`) runs on the same student, teacher and prompts, in one
process, alternating the variants so drift in machine speed hits both alike:
  - `generate`: sampling only (Δ-IFD off);
  - `generate+ifd`: sampling, the three extra forwards of Δ-IFD scoring, and the band selection.
All of this happens in the generator, off the training critical path: the cost shows up as generator throughput,
not as trainer time.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch
from kit.cli import preset_parser
from kit.registry import PAIRS, presets
from kit.report import print_table, write_report
from trl.experimental.utils import DataCollatorForChatML

from trl_npd.engine import EngineConfig, TransformersEngine
from trl_npd.generator import generate_batch, scoring_stage
from trl_npd.prompts import PromptStream
from trl_npd.selection import DeltaIFDSettings
from trl_npd.toy import arithmetic_dataset

PRESETS = presets("ifd_cost")  # kit/registry.py: the pair, generation batch, new tokens, timed rounds
COLUMNS = [("variant", "variant", ""), ("ms/sample", "ms_per_sample", ".2f"), ("vs generate", "vs_generate", ".2f")]


def main() -> None:
    parser = preset_parser(__doc__, PRESETS, default="cpu")
    parser.add_argument("--out", default="results/ifd_cost.json")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    tokenizer, student, teacher = PAIRS[preset["pair"]].build()
    student, teacher = student.eval(), teacher.eval()
    engine_config = EngineConfig(
        max_new_tokens=preset["new_tokens"],
        temperature=0.9,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    delta_ifd = DeltaIFDSettings("quantile", 0.0, 0.8, (0.1, 0.9), 1024, 256)
    variants = {
        "generate": (TransformersEngine(student, engine_config), (None, None)),
        "generate+ifd": (
            TransformersEngine(student, engine_config, record_t1=True),
            scoring_stage(teacher, student, None, delta_ifd, tokenizer.bos_token_id, engine_config),
        ),
    }
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=256)
    seconds = {name: [] for name in variants}
    for repeat in range(preset["repeats"] + 1):
        for name, (engine, (scorer, selector)) in variants.items():
            prompts = PromptStream(arithmetic_dataset(256), collator, seed=repeat)  # the same prompts for both
            start = time.perf_counter()
            batch = generate_batch(engine, prompts, preset["batch"], 0, 0, scorer, selector)
            elapsed = time.perf_counter() - start
            if repeat > 0:  # the first round warms up
                seconds[name].append(elapsed / (len(batch.samples) + sum(batch.dropped.values())))
    ms = {name: statistics.median(s) * 1000 for name, s in seconds.items()}
    runs = [{"variant": name, "ms_per_sample": m, "vs_generate": m / ms["generate"]} for name, m in ms.items()]
    report = {
        "benchmark": "ifd_cost",
        "preset": args.preset,
        "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "runs": runs,
    }
    write_report(report, args.out)
    print_table(runs, COLUMNS)


if __name__ == "__main__":
    main()
