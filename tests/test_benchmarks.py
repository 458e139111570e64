"""The benchmark scripts are not run by CI, but each runs here on a micro preset so it cannot rot."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def run(script, *args):
    done = launch(script, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


PROVENANCE = {"commit", "date", "machine", "platform", "cpu_count", "python", "torch", "transformers", "trl"}


def written(path):
    """A benchmark's JSON report, which says where its numbers come from (kit/provenance.py)."""
    report = json.loads(path.read_text())
    provenance = report["provenance"]
    assert set(provenance) == PROVENANCE, provenance
    assert provenance["torch"] == torch.__version__ and provenance["cpu_count"] == os.cpu_count()
    return report


def refused(script, *args):
    """The error output of a run that must fail."""
    done = launch(script, *args)
    assert done.returncode != 0, done.stdout[-3000:]
    return done.stderr


def test_overlap_benchmark_micro(tmp_path):
    out = tmp_path / "overlap.json"
    table = run("overlap.py", "--preset", "micro", "--modes", "thread,inline", "--out", str(out))
    report = written(out)
    assert [r["mode"] for r in report["runs"]] == ["thread", "inline"]
    assert all(r["samples_per_s"] > 0 for r in report["runs"])
    assert "overlap" in table


def test_loss_memory_benchmark_micro(tmp_path):
    out = tmp_path / "loss_memory.json"
    run(
        "loss_memory.py",
        "--tokens",
        "64",
        "--vocab",
        "500",
        "--hidden",
        "32",
        "--impls",
        "unfused,fused",
        "--out",
        str(out),
    )
    rows = written(out)["runs"]
    assert {(r["impl"], r["tokens"]) for r in rows} == {("unfused", 64), ("fused", 64)}
    assert all(r["status"] == "ok" and r["peak_mb"] > 0 and r["ms_per_call"] > 0 for r in rows)


def test_ifd_cost_benchmark_micro(tmp_path):
    out = tmp_path / "ifd.json"
    run("ifd_cost.py", "--preset", "micro", "--out", str(out))
    runs = written(out)["runs"]
    assert [r["variant"] for r in runs] == ["generate", "generate+ifd"]
    assert all(r["ms_per_sample"] > 0 for r in runs)


def test_throughput_benchmark_micro(tmp_path):
    out = tmp_path / "throughput.json"
    trainers = "gkd,distillation,npd-distillation,npd,npd-topk,ceiling"
    table = run("throughput.py", "--preset", "micro", "--trainers", trainers, "--out", str(out))
    report = written(out)
    assert {"preset", "device", "date", "runs", "ceiling_samples_per_s"} <= set(report)
    assert [r["trainer"] for r in report["runs"]] == trainers.split(",")
    for r in report["runs"]:
        assert {"samples_per_s", "completion_tokens_per_s", "wall_s", "peak_mem_mb", "wait_frac"} <= set(r)
        assert 0 < r["steady_completion_tokens_per_s"] and r["setup_s"] > 0
        # the same work: every trainer trained the same number of samples, on completion tokens it generated
        assert r["samples"] == report["steps"] * report["effective_batch"]
        assert 0 < r["completion_tokens"] <= r["samples"] * report["new_tokens"]
        assert r["mean_completion_tokens"] == r["completion_tokens"] / r["samples"] and 0 <= r["pad_frac"] < 1
        assert r["samples_per_s"] > 0 and r["peak_mem_mb"] > 0
    by_name = {r["trainer"]: r for r in report["runs"]}
    assert by_name["gkd"]["wait_frac"] is None and 0 <= by_name["npd"]["wait_frac"] <= 1
    assert by_name["gkd"]["steady_wait_frac"] is None and by_name["gkd"]["startup_wait_s"] is None
    for name in ("npd", "npd-topk"):
        assert (
            0 <= by_name[name]["steady_wait_frac"] <= 1
            and 0 <= by_name[name]["startup_wait_s"] <= by_name[name]["wall_s"]
        )
    assert report["ceiling_samples_per_s"] == by_name["ceiling"]["samples_per_s"]
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert "vs gkd" in table


def test_arena_benchmark_micro(tmp_path):
    out = tmp_path / "seed-3.json"
    cache = tmp_path / "cache"
    methods = "sft,gkd,npd,npd-topk"
    arena = ("arena.py", "--preset", "micro", "--methods", methods, "--cache-dir", str(cache))
    table = run(*arena, "--seed", "3", "--out", str(out))
    report = written(out)
    assert {"task", "teacher_acc", "student_init_acc", "eval_prompts", "runs"} <= set(report)
    assert report["eval_prompts"] == 16
    assert [r["method"] for r in report["runs"]] == methods.split(",")
    gkd = report["runs"][1]
    level = gkd["final_acc_smoothed"]
    for r in report["runs"]:
        assert 0 <= r["acc"] <= 1 and r["wall_s"] > 0 and r["steps"] == 4
        times = [p["wall_s"] for p in r["curve"]]
        assert times == sorted(times) and times[0] == 0 and r["curve"][0]["acc"] == report["student_init_acc"]
        assert r["curve"][-1]["acc"] == r["acc"]
        final = [p["acc"] for p in r["curve"][-2:]]  # the micro preset smooths over the last 2 checkpoints
        assert r["final_acc_smoothed"] == pytest.approx(sum(final) / 2)
        # time to GKD's final accuracy: the first checkpoint whose trailing mean (over 2) reaches it, or never
        accs = [p["acc"] for p in r["curve"]]
        trailing = [sum(accs[max(0, i - 1) : i + 1]) / len(accs[max(0, i - 1) : i + 1]) for i in range(len(accs))]
        expected = next((t for t, a in zip(times, trailing, strict=True) if a >= level - 1e-12), None)
        assert r["time_to_gkd_final_s"] == expected
    # the NPD runs leave one record per sample fate next to the JSON
    records = [json.loads(line) for line in open(tmp_path / "seed-3.npd.samples.jsonl")]
    trained = [x for x in records if x["fate"] == "trained"]
    assert len(trained) == report["runs"][2]["npd"]["trained_samples"] == 4 * 4
    assert all({"prompt_index", "policy_version", "staleness", "ifd_delta"} <= set(x) for x in trained)
    assert (tmp_path / "seed-3.png").stat().st_size > 0
    assert not report["teacher_cached"] and any(cache.iterdir())
    # another method added to the same seed: same warm start, time to quality against that seed's GKD run
    added = tmp_path / "seed-3-added.json"
    run(*arena, "--seed", "3", "--methods", "npd-ifd,sft-truth", "--add-to", str(out), "--out", str(added))
    merged = written(added)
    assert [r["method"] for r in merged["runs"]] == [*methods.split(","), "npd-ifd", "sft-truth"]
    new_run, truth_run = merged["runs"][-2:]
    assert new_run["npd"]["trained_samples"] == 4 * 4 and "added" in new_run
    assert truth_run["steps"] == 4 and "npd" not in truth_run and "added" in truth_run
    # seeds that ran different methods are not paired
    stderr = refused("arena.py", "--summarize", str(added), str(out), "--out", str(tmp_path / "x.json"))
    assert "['npd-ifd', 'sft-truth'] are not in all of them" in stderr
    assert merged["runs"][:-2] == report["runs"]
    # a second seed takes the cached teacher
    out2 = tmp_path / "seed-4.json"
    run(*arena, "--seed", "4", "--out", str(out2))
    assert written(out2)["teacher_cached"]
    assert "final (smoothed)" in table
    # the seeds combine into paired differences to GKD with a 95% interval, and time to GKD's final accuracy
    summary_path = tmp_path / "summary.json"
    summary_table = run("arena.py", "--summarize", str(out), str(out2), "--out", str(summary_path))
    summary = written(summary_path)
    assert summary["seeds"] == [3, 4]
    rows = {row["method"]: row for row in summary["methods"]}
    per_seed = [{r["method"]: r for r in written(p)["runs"]} for p in (out, out2)]
    diffs = [s["npd"]["final_acc_smoothed"] - s["gkd"]["final_acc_smoothed"] for s in per_seed]
    assert rows["npd"]["minus_gkd"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert rows["npd"]["minus_gkd"]["lo"] <= rows["npd"]["minus_gkd"]["mean"] <= rows["npd"]["minus_gkd"]["hi"]
    assert rows["gkd"]["minus_gkd"]["mean"] == 0
    assert rows["npd"]["time_to_gkd_final_s"] == [s["npd"]["time_to_gkd_final_s"] for s in per_seed]

    def smoothed_at_half(run):  # the last checkpoint within half the steps, averaged with the one before (window 2)
        accs = [p["acc"] for p in run["curve"] if p["step"] <= run["steps"] / 2]
        return sum(accs[-2:]) / len(accs[-2:])

    half = [smoothed_at_half(s["npd"]) - smoothed_at_half(s["gkd"]) for s in per_seed]
    assert rows["npd"]["half_steps_minus_gkd"]["mean"] == pytest.approx(sum(half) / 2)
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert "minus gkd" in summary_table and "time to gkd final" in summary_table
    # the NPD runs' per-sample records, summarized over the seeds
    records_path = tmp_path / "records.json"
    records_table = run("arena.py", "--records", str(out), str(out2), "--out", str(records_path))
    records = written(records_path)["methods"]
    assert set(records) == {"npd", "npd-topk"}  # the methods that wrote records; sft and gkd have none
    for method in records:
        assert records[method]["seeds"] == 2
        assert records[method]["fates"]["trained"] == sum(s[method]["npd"]["trained_samples"] for s in per_seed)
    assert "fates" in records_table


def test_arena_sft_methods_train_on_teacher_samples_or_the_worked_answers():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import arena

    task = arena.Multiplication(arena.PRESETS["micro"])
    tokenizer = task.tokenizer
    prompts = task.train[:32]
    answers = [answer for _, answer in prompts]
    # the worked answers themselves, with no teacher: nothing is sampled
    assert arena.sft_completions("sft-truth", None, tokenizer, prompts, 8, 0.9, seed=0) == answers
    # `sft` samples the teacher: an untrained one writes anything but the worked answers
    teacher = arena.build_model(tokenizer, hidden_size=16, num_layers=1, seed=0)
    sampled = arena.sft_completions("sft", teacher, tokenizer, prompts, 8, 0.9, seed=0)
    assert len(sampled) == len(prompts) and sampled != answers


def test_arena_learning_rate_grid_micro(tmp_path):
    out = tmp_path / "tuning.json"
    args = ("--preset", "micro", "--methods", "sft,gkd", "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    table = run("arena.py", "--tune", *args)
    tuning = written(out)
    assert tuning["seed"] == 0 and set(tuning["grid"]) == {"sft", "gkd"}
    for method, rates in tuning["grid"].items():
        assert set(rates) == {"0.0005", "0.001"}
        assert rates[f"{tuning['best_lr'][method]:g}"] == max(rates.values())
    assert "best" in table
    # a rate past the grid's edge, added to the same grid: the best is chosen over all three
    extended = tmp_path / "tuning-extended.json"
    more = ("--lr-grid", "0.002", "--add-to", str(out), "--out", str(extended))
    extended_table = run("arena.py", "--tune", *args[:-2], *more)
    assert "0.002" in extended_table.splitlines()[-3]  # the table's header has all three rates
    merged = written(extended)
    assert len(merged["runs"]) == len(tuning["runs"]) + 1
    for method, rates in merged["grid"].items():
        assert set(rates) == {"0.0005", "0.001", "0.002"}
        assert {k: v for k, v in rates.items() if k != "0.002"} == tuning["grid"][method]
        assert rates[f"{merged['best_lr'][method]:g}"] == max(rates.values())
    # one method at its edge extended alone: the others keep their rates
    edge = tmp_path / "tuning-edge.json"
    only_sft = ("--preset", "micro", "--methods", "sft", "--cache-dir", str(tmp_path / "cache"))
    run("arena.py", "--tune", *only_sft, "--lr-grid", "0.004", "--add-to", str(extended), "--out", str(edge))
    edged = written(edge)
    assert set(edged["grid"]["sft"]) == {"0.0005", "0.001", "0.002", "0.004"}
    assert edged["grid"]["gkd"] == merged["grid"]["gkd"] and edged["best_lr"]["gkd"] == merged["best_lr"]["gkd"]
    assert edged["grid"]["sft"][f"{edged['best_lr']['sft']:g}"] == max(edged["grid"]["sft"].values())
    # refused: a rate the grid already has, a method the grid does not have, a grid of another student
    other_student = tmp_path / "tuning-other-student.json"
    other = written(out)
    for report in other["runs"]:
        report["student_params"] += 1
    other_student.write_text(json.dumps(other))
    for flags, grid, message in [
        (("--methods", "sft,gkd", "--lr-grid", "0.001"), out, "already has the rates"),
        (("--methods", "gkd", "--lr-grid", "0.0005"), out, "already has the rates"),
        (("--methods", "sft,npd", "--lr-grid", "0.003"), out, "that grid has no ['npd']"),
        (("--methods", "sft", "--lr-grid", "0.003"), other_student, "that grid tuned another student"),
    ]:
        more = ("--cache-dir", str(tmp_path / "cache"), "--add-to", str(grid), "--out", str(tmp_path / "x.json"))
        assert message in refused("arena.py", "--tune", "--preset", "micro", *flags, *more)


def test_lora_sync_benchmark_micro(tmp_path):
    out = tmp_path / "lora.json"
    table = run("lora_sync.py", "--preset", "micro", "--out", str(out))
    report = written(out)
    rows = {r["variant"]: r for r in report["sync"]}
    assert set(rows) == {"adapters", "merged", "full"}
    # adapters are what training changes: fewer bytes than the merged modules, which are fewer than everything
    assert 0 < rows["adapters"]["mb"] < rows["merged"]["mb"] < rows["full"]["mb"]
    assert all(r["ms_per_sync"] > 0 for r in rows.values())
    assert report["generation"]["lora_snapshot_ms_per_token"] > 0 and report["generation"]["merged_ms_per_token"] > 0
    assert "ms/sync" in table


def test_multi_rank_benchmark_micro(tmp_path):
    out = tmp_path / "multi_rank.json"
    table = run("multi_rank.py", "--preset", "micro", "--repeats", "1", "--out", str(out))
    report = written(out)
    assert sorted(r["placement"] for r in report["runs"]) == ["per_rank", "shared"]
    assert all(r["world_size"] == 2 and r["samples_per_s"] > 0 for r in report["runs"])
    assert "shared / per-rank" in table


def test_soak_benchmark_100_steps(tmp_path):
    """The soak's short version, in CI: the staleness bound and the exact accounting over 100 steps at the defaults,
    with weight syncs throughout; RSS is recorded for both processes (its 5% target is the 1,000-step run's)."""
    out = tmp_path / "soak.json"
    table = run("soak.py", "--steps", "100", "--record-every", "10", "--warmup-steps", "20", "--out", str(out))
    report = written(out)
    assert report["steps"] == 100
    # every scheduled sync (and any early refresh, had max_policy_kl been set)
    assert report["weight_syncs"] >= 100 // report["settings"]["weight_sync_steps"]
    assert [r["step"] for r in report["records"]] == list(range(10, 101, 10))
    assert all(r["rss_trainer_mb"] > 0 and r["rss_generator_mb"] > 0 for r in report["records"])
    # a tripwire for a gross leak only: 100 steps are too few to hold the 5% target to
    assert all(-0.25 < g < 0.25 for g in report["rss_growth_frac"].values()), report["rss_growth_frac"]
    assert report["stale_trained"] == 0 and report["staleness"]["max"] <= report["settings"]["max_staleness"]
    assert report["staleness"]["trained_samples"] == report["accounting"]["trained"] > 0
    accounting = report["accounting"]
    assert accounting["exact"]
    dropped = sum(accounting["dropped"].values())
    assert accounting["generated"] == accounting["trained"] + dropped + accounting["unused"]
    assert (tmp_path / "soak.png").stat().st_size > 0
    assert "accounting" in table and "exact" in table


def test_generation_batch_benchmark_micro(tmp_path):
    out = tmp_path / "generation_batch.json"
    table = run("generation_batch.py", "--samples", "8", "--rounds", "1", "--out", str(out))
    report = written(out)
    # only the batch sizes that 8 samples fill
    assert [r["generation_batch_size"] for r in report["runs"]] == [4, 8]
    assert all(r["ms_per_sample"] > 0 for r in report["runs"])
    # weight_sync_steps + 3 * batch / per_step - 2, at weight_sync_steps 4 and 8 samples a step
    assert [r["worst_staleness_steps"] for r in report["runs"]] == [3.5, 5.0]
    for r in report["runs"]:
        assert r["minimal_loop_ms_per_sample"] > 0
        assert r["sampler_overhead_frac"] == pytest.approx(r["ms_per_sample"] / r["minimal_loop_ms_per_sample"] - 1)
        assert r["fits_max_staleness"] == (r["worst_staleness_steps"] <= 8)
    assert "worst staleness" in table


def test_topk_jsd_benchmark_micro(tmp_path):
    out = tmp_path / "topk_jsd.json"
    table = run("topk_jsd.py", "--train-steps", "3", "--samples", "2", "--new-tokens", "4", "--out", str(out))
    report = written(out)
    assert set(report["pairs"]) == {"random", "trained"}
    for pair in report["pairs"].values():
        by_k = {}
        for r in pair["rows"]:
            assert r["loss_rel_error"] >= 0 and -1 <= r["grad_cosine"] <= 1 + 1e-6
            by_k.setdefault(r["beta"], []).append(r["teacher_tail_mass"])
        for tails in by_k.values():  # a larger k leaves the teacher less mass outside it
            assert tails == sorted(tails, reverse=True)
    assert "grad err" in table


def test_profile_benchmark_sorts_both_processes_samples_into_stages(tmp_path):
    import shutil

    if shutil.which("py-spy") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "py-spy")):
        pytest.skip("py-spy is not installed (pip install py-spy); benchmarks/profile_npd.py needs it")
    out = tmp_path / "profile.json"
    # without the bootstrap, so the short run cannot end before the generator process has sampled anything, and
    # enough steps that a micro model's few-millisecond training steps are sampled at all
    table = run(
        "profile_npd.py",
        "--preset",
        "micro",
        "--trainer",
        "npd-process",  # the generator process, named whatever the default is
        "--no-bootstrap",
        "--steps",
        "60",
        "--rate",
        "200",
        "--out",
        str(out),
    )
    report = written(out)
    trainer, generator = report["processes"]["trainer"], report["processes"]["generator"]
    assert sum(trainer.values()) > 0 and sum(generator.values()) > 0  # both processes were sampled
    assert trainer["student forward"] + trainer["backward"] > 0  # the training step was seen and classified
    assert "generator:" in table


def test_arena_pilot_variants_keep_the_arithmetic_and_mask_only_the_wrong_digits(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import arena
    import arena_pilots

    rng = random.Random(0)
    pairs = [arena_pilots.repaired_problem(rng, 5, repair_rate=0.3) for _ in range(200)]
    repaired = 0
    for question, answer in pairs:
        a, d = (int(x) for x in question.split("*"))
        assert arena.answer_of(answer) == str(a * d)
        # without its wrong steps, the trace is the arena's own: the right partials, carries added
        carry, partials = 0, []
        for digit in reversed(question.split("*")[0]):
            partials.append(f"{int(digit) * d + carry:02d}")
            carry = (int(digit) * d + carry) // 10
        assert arena_pilots.clean(answer) == " ".join(partials) + f":{a * d}"
        for position in arena_pilots.wrong_digits(answer):  # each names a digit of a wrong partial, before `<`
            assert answer[position].isdigit() and "<" in answer[position : position + 3]
        repaired += answer.count("<")
    assert 0.2 < repaired / (5 * len(pairs)) < 0.4  # about the rate asked for
    # supervised training does not train on the positions `untrained` names, and trains on all the others
    seen = []
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(
        torch.nn.functional,
        "cross_entropy",
        lambda logits, labels, **kw: seen.append(labels) or cross_entropy(logits, labels, **kw),
    )
    tokenizer = arena.character_tokenizer("<")
    model = arena.build_model(tokenizer, hidden_size=16, num_layers=1, seed=0)
    pair = next(p for p in pairs if "<" in p[1])
    for untrained, masked in ((arena_pilots.wrong_digits, arena_pilots.wrong_digits(pair[1])), (None, [])):
        seen.clear()
        arena.supervised(model, tokenizer, [pair], steps=1, batch=1, lr=1e-3, seed=0, untrained=untrained)
        ids, prompt_len = arena.encode(tokenizer, *pair)
        trained = seen[0].reshape(1, -1)[0, prompt_len - 1 : len(ids) - 1].tolist()  # labels are shifted by one
        expected = [-100 if i in masked else token for i, token in enumerate(ids[prompt_len:])]
        assert trained == expected
    # `dagger` (and only it) keeps the teacher off the wrong digits and the student on clean answers; both repair
    # variants train their teacher without label smoothing, on their own task (its name keys the teacher's cache)
    preset = arena.PRESETS["micro"]
    repair, dagger = (arena_pilots.variant_task(v, preset, 0.3) for v in ("repair", "dagger"))
    assert repair.untrained is None and repair.student_pairs() == repair.train
    assert dagger.untrained is arena_pilots.wrong_digits
    assert dagger.student_pairs() == [(q, arena_pilots.clean(a)) for q, a in dagger.train]
    assert any("<" in a for _, a in dagger.train) and not any("<" in a for _, a in dagger.student_pairs())
    for task in (repair, dagger):
        assert task.preset["teacher"]["label_smoothing"] == 0 and task.preset["distill"]["beta"] == 0.5
        assert f"({task.variant})" in task.name and task.name.startswith(arena.Multiplication(preset).name)
    assert preset["teacher"]["label_smoothing"] == 0.1  # the arena's own preset is left as it was
    draws = random.Random(1)
    assert any("<" in dagger.problem(draws)[1] for _ in range(20))
    # one room for every generation, from the repaired data; `reverse-kl` keeps the arena's task, at beta 1
    longest = max(len(answer) for _, answer in dagger.held_out + dagger.train)
    assert dagger.new_tokens(dagger.student_pairs()) == longest + 2 + arena_pilots.REPAIR_ROOM_TOKENS
    reverse = arena_pilots.variant_task("reverse-kl", preset, 0.3)
    assert type(reverse) is arena.Multiplication and reverse.preset["distill"]["beta"] == 1.0
    # the arena's own ids do not move when a variant adds a character
    assert all(
        arena.character_tokenizer("<").convert_tokens_to_ids(t) == i
        for t, i in arena.character_tokenizer().vocab.items()
    )


def test_arena_pilots_micro(tmp_path):
    out = tmp_path / "dagger.json"
    cache = tmp_path / "cache"
    pilot = ("arena_pilots.py", "--preset", "micro", "--cache-dir", str(cache))
    table = run(*pilot, "--variant", "dagger", "--runs", "gkd@1e-3,sft@1e-3,sft-truth@1e-3", "--out", str(out))
    report = written(out)
    assert report["variant"] == "dagger" and report["repair_rate"] == 0.3 and report["teacher"]["label_smoothing"] == 0
    assert "repaired (dagger)" in report["task"] and "teacher_samples_repairing" in report
    # the student trains on clean answers, but its rollouts get the room of the repaired data, as evaluation does
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import arena
    import arena_pilots

    task = arena_pilots.variant_task("dagger", arena.PRESETS["micro"], 0.3)
    longest = max(len(answer) for _, answer in task.held_out + task.train)
    assert report["max_new_tokens"] == longest + 2 + arena_pilots.REPAIR_ROOM_TOKENS
    assert [(r["method"], r["lr"]) for r in report["runs"]] == [("gkd", 1e-3), ("sft", 1e-3), ("sft-truth", 1e-3)]
    for r in report["runs"]:
        assert r["final_acc_smoothed"] == pytest.approx(sum(p["acc"] for p in r["curve"][-2:]) / 2)
    assert "final (smoothed)" in table
    # another seed of the same variant pairs with the first, as the arena's seeds do
    seed_2 = tmp_path / "dagger-seed-2.json"
    run(
        *pilot,
        "--variant",
        "dagger",
        "--seed",
        "2",
        "--runs",
        "gkd@1e-3,sft@1e-3,sft-truth@1e-3",
        "--out",
        str(seed_2),
    )
    summary_path = tmp_path / "summary.json"
    run("arena.py", "--summarize", str(out), str(seed_2), "--out", str(summary_path))
    summary = written(summary_path)
    rows = {row["method"]: row for row in summary["methods"]}
    per_seed = [{r["method"]: r for r in written(p)["runs"]} for p in (out, seed_2)]
    diffs = [s["sft"]["final_acc_smoothed"] - s["gkd"]["final_acc_smoothed"] for s in per_seed]
    assert summary["seeds"] == [0, 2] and rows["sft"]["minus_gkd"]["mean"] == pytest.approx(sum(diffs) / 2)
    # a seed that ran a method twice (a pilot of two rates) has nothing to pair: refused, not silently overwritten
    twice = written(seed_2)
    twice["runs"].append(twice["runs"][0])
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    stderr = refused("arena.py", "--summarize", str(out), str(tmp_path / "twice.json"), "--out", str(tmp_path / "x"))
    assert "ran a method more than once" in stderr
    reverse = tmp_path / "reverse-kl.json"
    run(*pilot, "--variant", "reverse-kl", "--runs", "gkd@1e-3", "--out", str(reverse))
    reverse_report = written(reverse)
    assert reverse_report["distill"]["beta"] == 1.0 and reverse_report["repair_rate"] is None
    assert len(list(cache.iterdir())) == 2  # a teacher per task: the variant's data are not the arena's
    for bad in ("gkd", "gkd@fast", "nope@1e-3", "gkd@0", "gkd@nan"):
        assert "not METHOD@LR" in refused(*pilot, "--variant", "dagger", "--runs", bad, "--out", str(tmp_path / "x"))


def test_throughput_counts_each_trainers_padding_in_its_own_layout():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from throughput import padded_positions

    from trl_npd.batching import Sequence, pad_sequences
    from trl_npd.packing import pack_sequences

    pad = 0
    sequences = [Sequence(input_ids=[5] * n, labels=[5] * n) for n in (7, 3, 2)]
    # right-padded to the longest: 3 rows x 7 positions, 12 real tokens
    assert padded_positions(pad_sequences(sequences, pad), pad) == (21, 9)
    # packed into rows of 7: [7] and [3, 2] plus 2 padding positions at the second row's tail
    packed, _ = pack_sequences(sequences, 7, pad)
    assert packed["input_ids"].shape == (2, 7) and "attention_mask" not in packed
    assert padded_positions(packed, pad) == (14, 2)
    # DistillationTrainer's prompt and completion tensors, with their masks
    distillation = {
        "prompt_ids": torch.ones(2, 4, dtype=torch.long),
        "prompt_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
        "completion_ids": torch.ones(2, 3, dtype=torch.long),
        "completion_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
    }
    assert padded_positions(distillation, pad) == (14, 3)
