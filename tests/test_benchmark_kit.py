"""benchmarks/kit: what every benchmark script shares (presets, reports and their provenance, quiet training
arguments, the training clock, children and their results)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

from kit import child, registry, report, training  # noqa: E402
from kit.provenance import git_commit, provenance  # noqa: E402


def test_a_report_carries_its_provenance_and_a_cache_does_not(tmp_path):
    data = {"runs": [1, 2]}
    report.write_report(data, str(tmp_path / "out" / "report.json"))
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == {"runs": [1, 2], "provenance": provenance()} and data == {"runs": [1, 2]}
    stamp = written["provenance"]
    assert stamp["cpu_count"] == os.cpu_count() and re.fullmatch(r"\d+\.\d+\.\d+", stamp["python"])
    assert all(stamp[library] for library in ("torch", "transformers", "trl"))
    assert stamp["commit"] is None or re.fullmatch(r"[0-9a-f]{4,}(\+dirty)?", stamp["commit"])
    assert stamp["commit"] == git_commit() or stamp["commit"] + "+dirty" == git_commit()  # or the tree changed since
    report.write_json(data, str(tmp_path / "cache.json"))
    assert json.loads((tmp_path / "cache.json").read_text()) == data
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]  # written whole, then renamed
    # a report that merges one written by another process keeps that process's provenance, and adds its own
    earlier = {**stamp, "commit": "0000000", "date": "2026-01-01T00:00:00+00:00"}
    report.write_report({"runs": [1, 2, 3], "provenance": earlier}, str(tmp_path / "merged.json"))
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["provenance"] == earlier and merged["provenance_added"] == [provenance()]


def test_a_child_runs_no_git_of_its_own():
    """A child handing its result back takes no commit (the parent's report has it): git run as the child's child
    would count in its peak memory."""
    command = _python(
        "from kit.provenance import LOADED_COMMIT; from kit.child import hand_back; hand_back(LOADED_COMMIT)"
    )
    assert child.run_child(command).result is None


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {BENCHMARKS!r}); {code}"]


def test_a_child_hands_its_result_back_whatever_it_prints():
    hands_back = _python("print('RESULT noise'); from kit.child import hand_back; hand_back({'rate': 2.5}); print(1)")
    run = child.run_child(hands_back)
    assert (run.result, run.returncode) == ({"rate": 2.5}, 0)
    assert child.child_result(hands_back, "the child") == {"rate": 2.5}
    # a child that hands nothing back, or fails, stops the parent with the end of what the child said
    for command in (_python("print('done')"), _python("raise ValueError('boom')")):
        with pytest.raises(SystemExit, match="the child failed"):
            child.child_result(command, "the child")
    assert "ValueError: boom" in child.run_child(_python("raise ValueError('boom')")).stderr
    with pytest.raises(subprocess.TimeoutExpired):
        child.run_child(_python("import time; time.sleep(30)"), timeout_s=0.5)
    # run by hand, with no parent asking, the child prints its result
    env = {k: v for k, v in os.environ.items() if k != child.RESULT_FILE_ENV}
    printed = subprocess.run(
        _python("from kit.child import hand_back; hand_back({'rate': 2.5})"), capture_output=True, text=True, env=env
    )
    assert json.loads(printed.stdout) == {"rate": 2.5}


def test_quiet_training_arguments_under_the_callers_settings(tmp_path):
    from transformers import TrainingArguments

    args = training.quiet_args(TrainingArguments, str(tmp_path), max_steps=3)
    assert (args.max_steps, args.seed, args.logging_steps, args.disable_tqdm, args.bf16) == (3, 0, 10**6, True, False)
    assert args.report_to == [] and args.save_strategy == "no"
    assert training.quiet_args(TrainingArguments, str(tmp_path), seed=7, logging_steps=5).logging_steps == 5


def test_the_training_clock_keeps_pauses_off_and_adds_its_offset(monkeypatch):
    ticks = iter([10.0, 12.0, 13.5, 20.0])  # begin; a pause from 12 to 13.5; stop
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(ticks))
    clock = training.TrainingClock(offset_s=0.25)
    clock.on_train_begin(None, None, None)
    with clock.paused():
        pass
    assert clock.stop() == clock.wall_s == 20.0 - 10.0 - 1.5 + 0.25


def test_presets_are_copies_and_spread_one_rate_over_the_methods():
    arena = registry.presets("arena", ["sft", "gkd"])
    assert arena["micro"]["lr"] == {"sft": 5e-4, "gkd": 5e-4}
    assert arena["cpu"]["lr"]["sft"] == 0.01  # a table stays the table
    arena["micro"]["digits"] = 9
    arena["cpu"]["lr"]["sft"] = 1.0  # nested settings are copies too
    assert registry.presets("arena")["micro"]["digits"] == 2 and registry.presets("arena")["cpu"]["lr"]["sft"] == 0.01
    # every named pair is in the registry
    for benchmark in ("throughput", "overlap", "ifd_cost", "multi_rank"):
        for preset in registry.presets(benchmark).values():
            assert preset["pair"] in registry.PAIRS


def test_the_warm_smollm2_preset_trains_the_real_arenas_seed_1_student(tmp_path, monkeypatch):
    """`cpu-smollm2-warm` is `cpu-smollm2` with the student the real-model arena's seed 1 starts from, read from the
    arena's own cache. A tiny teacher stands in for SmolLM2 (no gguf here); the cache holds starts of seeds 1 and 2,
    and a start computed again (a cache miss: another seed or arena preset) fails the test."""
    import arena_real
    import smollm2
    import torch

    from trl_npd.toy import build_model, build_tokenizer

    throughput = registry.presets("throughput")
    warm = throughput["cpu-smollm2-warm"]
    assert warm["pair"] != "smollm2-10-layers"
    assert {**warm, "pair": None} == {**throughput["cpu-smollm2"], "pair": None}  # the same work otherwise
    tokenizer = build_tokenizer()
    teacher = build_model(tokenizer, hidden_size=16, num_layers=12, num_heads=2, seed=0)
    monkeypatch.setattr(smollm2, "load_teacher", lambda cache_dir: (tokenizer, teacher))
    monkeypatch.setattr(smollm2, "CACHE_DIR", str(tmp_path))
    # the arena's references stand in for the teacher's answers, which key the cached starts
    refs = {"held_out": [{"prompt": "What is 2+2?"}], "warmup_pairs": [["What is 2+2?", "4"]]}
    monkeypatch.setattr(arena_real, "references", lambda preset, tokenizer, teacher, cache_dir: refs)
    for seed in (1, 2):  # each seed's start with weights all equal to its seed
        cached = smollm2.pruned_student(teacher, 10)
        for parameter in cached.parameters():
            parameter.data.fill_(float(seed))
        path, _ = arena_real.start_paths(arena_real.PRESETS["cpu"], seed, refs, str(tmp_path))
        torch.save(cached.state_dict(), f"{path}.pt")
        (tmp_path / f"{os.path.basename(path)}.json").write_text(json.dumps({"teacher": {}, "pruned": {}, "warm": {}}))
    monkeypatch.setattr(arena_real.arena, "supervised", lambda *a, **k: pytest.fail("the warm start ran again"))
    monkeypatch.setattr(arena_real, "Evaluator", lambda *a, **k: pytest.fail("a start was evaluated again"))

    built_tokenizer, student, built_teacher = registry.PAIRS[warm["pair"]].build()
    assert built_tokenizer is tokenizer and built_teacher is teacher
    assert student.config.num_hidden_layers == len(student.model.layers) == 10
    assert all(bool((parameter == 1.0).all()) for parameter in student.parameters())  # seed 1's, not seed 2's
    # cpu-smollm2 keeps the pruned copy as cut: the teacher's own weights in its kept layers
    _, cold, _ = registry.PAIRS[throughput["cpu-smollm2"]["pair"]].build()
    assert torch.equal(cold.model.layers[-1].mlp.up_proj.weight, teacher.model.layers[-1].mlp.up_proj.weight)


def test_a_table_aligns_its_columns_and_marks_missing_values(capsys):
    rows = [
        {"name": "npd", "rate": 1.5, "ratio": None, "fits": True},
        {"name": "gkd-long-name", "rate": 12.25, "ratio": 0.5, "fits": False},
    ]
    columns = [("trainer", "name", ""), ("samples/s", "rate", ".2f"), ("vs gkd", "ratio", ".2f"), ("fits", "fits", "")]
    report.print_table(rows, columns)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "      trainer  samples/s    vs gkd      fits",
        "          npd       1.50         -       yes",
        "gkd-long-name      12.25      0.50        no",
    ]
