"""`benchmarks/generation_engines.py` is not run by CI, but its embedded-engine half runs here on a micro preset so it
cannot rot; its vLLM half runs in `.ci/vllm-cpu` (`test_vllm_cpu.py`)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generation_engines_benchmark_micro_embedded_engine(tmp_path):
    out = tmp_path / "engines.json"
    script = os.path.join(ROOT, "benchmarks", "generation_engines.py")
    done = subprocess.run(
        [sys.executable, script, "--preset", "micro", "--engines", "transformers", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["runs"]
    assert (row["engine"], row["batch_size"]) == ("transformers", 2)
    assert row["completion_tokens_per_s"] > 0 and 0 < row["mean_completion_tokens"] <= 4
    assert "tokens/s" in done.stdout
