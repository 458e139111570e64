"""The real-model arena's machinery (benchmarks/arena_real.py, benchmarks/smollm2.py) without the real model.

SmolLM2 comes from a wheel that only the benchmark set-up installs, so here a tiny Llama built in memory stands in for
it: the same architecture family, so pruning, prompts, references, metrics and the run records are all exercised.
"""

import argparse
import json
import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trl_npd.toy import build_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import arena_real
import smollm2


def tiny_llama(tokenizer, layers=4):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def test_pruning_keeps_evenly_spaced_layers_with_their_weights_and_a_working_cache():
    assert smollm2.kept_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert smollm2.kept_layers(30, 2) == [0, 29] and smollm2.kept_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot be cut"):
        smollm2.kept_layers(4, 5)
    tokenizer = build_tokenizer()
    teacher = tiny_llama(tokenizer, layers=5)
    student = smollm2.pruned_student(teacher, 3)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for new, old in enumerate(smollm2.kept_layers(5, 3)):
        assert torch.equal(student.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)
        assert student.model.layers[new].self_attn.layer_idx == new
    assert len(teacher.model.layers) == 5  # the teacher is untouched
    ids = torch.tensor([[1, 5, 6, 7]])
    out = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # the KV cache works
    assert out.shape == (1, 7)


def test_held_out_questions_are_never_trained_on_in_any_phrasing():
    answered = {row["key"] for row in smollm2.questions()}
    held_out, train = smollm2.prompt_splits(answered, held_out_keys=40, held_out_wrappers=7)
    assert {row["key"] for row in held_out}.isdisjoint({row["key"] for row in train})
    assert not {row["prompt"] for row in held_out} & {row["prompt"] for row in train}
    assert len(held_out) == 40 * 7 and len(train) == (len(answered) - 40) * len(smollm2.WRAPPERS)
    assert len({row["prompt"] for row in train}) == len(train)  # every phrasing of a question differs


def test_agreement_and_rouge_l():
    assert arena_real.first_sentence("The capital of France is Paris. It is big.") == "the capital of france is paris"
    assert arena_real.first_sentence("Paris!\nMore") == "paris"
    assert arena_real.rouge_l("the cat sat", "the cat sat") == 1.0
    assert arena_real.rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS "a c": P = R = 2/4
    assert arena_real.rouge_l("", "a") == 0.0 and arena_real.rouge_l("x y", "a b") == 0.0


def test_a_seed_runs_every_method_and_records_the_real_arena_fields(tmp_path, monkeypatch):
    tokenizer = build_tokenizer()
    teacher = tiny_llama(tokenizer)
    monkeypatch.setattr(smollm2, "load_teacher", lambda cache_dir: (tokenizer, teacher))
    # a random teacher never says "Paris": for the machinery, every answer counts as answered
    questions = smollm2.questions
    monkeypatch.setattr(smollm2, "questions", lambda: [{**row, "expected": ""} for row in questions()])
    preset = arena_real.PRESETS["micro"]
    args = argparse.Namespace(cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "seed-1.json"))
    methods = ["sft", "gkd", "distillation", "npd", "npd-distillation"]
    report = arena_real.run_seed(preset, 1, methods, dict(preset["lr"]), args)

    assert [run["method"] for run in report["runs"]] == methods
    assert report["eval_prompts"] == preset["held_out_keys"] * preset["held_out_wrappers"]
    for run in report["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        for point in run["curve"]:
            assert 0 <= point["acc"] <= 1 and 0 <= point["rouge_l"] <= 1 and point["kl_teacher"] >= 0
            assert point["reverse_kl"] >= 0 and 0 <= point["acc_sampled"] <= 1
        assert run["final_kl_teacher_smoothed"] == pytest.approx(sum(p["kl_teacher"] for p in run["curve"][1:]) / 2)
        assert "time_to_gkd_final_s" in run
    gkd = report["runs"][1]
    assert gkd["time_to_gkd_final_kl_s"] is not None  # GKD's own curve reaches its own final value
    for run in report["runs"]:  # the first checkpoint whose trailing mean (over 2) is at or below GKD's final KL
        kls = [p["kl_teacher"] for p in run["curve"]]
        trailing = [sum(kls[max(0, i - 1) : i + 1]) / len(kls[max(0, i - 1) : i + 1]) for i in range(len(kls))]
        level = gkd["final_kl_teacher_smoothed"]
        reached = [p["wall_s"] for p, kl in zip(run["curve"], trailing, strict=True) if kl <= level + 1e-12]
        expected = reached[0] if reached else None
        assert run["time_to_gkd_final_kl_s"] == expected
    npd = report["runs"][-1]["npd"]
    assert len(npd["sample_drift"]) == npd["trained_samples"] == 2 * 2
    # written after each method, so a stopped session keeps the finished ones
    written = json.load(open(args.out))
    assert [run["method"] for run in written["runs"]] == methods
    assert written["provenance"]["commit"] == report["commit"]  # the code as the benchmark loaded it
    # the references are cached in one file, keyed by the questions and the preset's settings; the seed's start
    # (the warm-started student and its evaluations) in another, which a second run on the seed starts from
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert [name.split("-")[0] for name in cached] == ["points", "references", "start", "start"]
    monkeypatch.setattr(arena_real.arena, "supervised", lambda *a, **k: pytest.fail("the warm start ran again"))
    more = argparse.Namespace(**{**vars(args), "out": str(tmp_path / "more.json"), "add_to": args.out})
    with pytest.raises(SystemExit, match=r"already has \['sft'\]"):
        arena_real.run_seed(preset, 1, ["sft"], dict(preset["lr"]), more)
    added = arena_real.run_seed(preset, 1, ["npd-topk"], dict(preset["lr"]), more)
    assert added["student_init"] == report["student_init"] and added["student_pruned"] == report["student_pruned"]
    assert [run["method"] for run in added["runs"]] == [*methods, "npd-topk"]
    assert added["runs"][0]["curve"] == report["runs"][0]["curve"]  # the earlier runs, as they were
    assert [run["method"] for run in json.load(open(more.out))["runs"]] == [*methods, "npd-topk"]
    # another seed's start evaluates only its own warm-started student: the teacher's and the pruned student's
    # evaluations do not depend on the seed and come from the cache
    evaluated = []
    monkeypatch.setattr(arena_real.arena, "supervised", lambda *a, **k: None)
    refs = arena_real.references(preset, tokenizer, teacher, args.cache_dir)
    _, (teacher_point, pruned, _) = arena_real.start(
        preset, 2, tokenizer, teacher, refs, lambda model, sampled=True: evaluated.append(model) or {}, args
    )
    assert len(evaluated) == 1 and evaluated[0] is not teacher and pruned == report["student_pruned"]
    assert teacher_point["acc_sampled"] == report["teacher_acc_sampled"]
    other = tmp_path / "other-seed.json"
    other.write_text(json.dumps({**report, "seed": 2}))
    with pytest.raises(SystemExit, match="another seed"):
        arena_real.run_seed(
            preset, 1, ["npd-topk"], dict(preset["lr"]), argparse.Namespace(**{**vars(more), "add_to": str(other)})
        )


def _seed_report(path, runs, seed=1, init_acc=0.05, commit="abc", wall_s=None):
    wall_s = wall_s or {}
    curve = [{"step": 0, "wall_s": 0.0, "acc": init_acc, "kl_teacher": 3.0}]
    records = []
    for method, lr, acc, kl in runs:
        points = [
            *curve,
            {"step": 60, "wall_s": 10.0, "acc": acc, "kl_teacher": kl},
            {"step": 120, "wall_s": 20.0, "acc": acc, "kl_teacher": kl},
        ]
        records.append(
            {"method": method, "lr": lr, "wall_s": wall_s.get(method, 20.0), "curve": points,
             "final_acc_smoothed": acc, "final_kl_teacher_smoothed": kl, "final_acc_sampled_smoothed": acc,
             "final_rouge_l_smoothed": acc, "final_reverse_kl_smoothed": kl, "time_to_gkd_final_s": None}
        )  # fmt: skip
    report = {
        "seed": seed, "distill": {"steps": 120}, "student_params": 10, "student_init": {"acc": init_acc,
        "kl_teacher": 3.0}, "student_init_acc": init_acc, "commit": commit, "final_points": 2, "runs": records,
        "task": "t", "eval_prompts": 5, "teacher_acc": 1.0, "total_s": 1.0,
    }  # fmt: skip
    path.write_text(json.dumps(report))
    return str(path)


def test_the_grid_picks_each_methods_best_rate_across_reports_and_refuses_mixed_setups(tmp_path):
    first = _seed_report(tmp_path / "a.json", [("gkd", 3e-4, 0.10, 1.8), ("npd", 3e-4, 0.11, 1.9)])
    second = _seed_report(
        tmp_path / "b.json", [("gkd", 1e-4, 0.20, 2.0), ("npd", 1e-4, 0.11, 1.7), ("sft", 1e-4, 0.15, 2.5)],
        commit="def",
    )  # fmt: skip
    out = str(tmp_path / "tuning.json")
    grid = arena_real.grid_from([first, second], out)

    assert grid["grid"]["gkd"] == {"0.0001": 0.20, "0.0003": 0.10}
    # agreement decides; on a tie, the lower final KL; a method run at one rate has no best rate
    assert grid["best_lr"] == {"gkd": 1e-4, "npd": 1e-4}
    assert grid["commits"] == ["abc", "def"]
    best = json.load(open(tmp_path / "tuning-best.json"))
    assert [(run["method"], run["lr"]) for run in best["runs"]] == [("gkd", 1e-4), ("npd", 1e-4), ("sft", 1e-4)]
    # recomputed against the best GKD run: its curve, smoothed over 2 points, reaches its own final at the end
    assert best["runs"][0]["time_to_gkd_final_s"] == 20.0
    assert best["runs"][1]["time_to_gkd_final_s"] is None  # npd's 0.11 never reaches GKD's 0.20

    again = _seed_report(tmp_path / "c.json", [("gkd", 1e-4, 0.3, 1.0), ("sft", 3e-4, 0.01, 3.0)])
    with pytest.raises(SystemExit, match="ran twice"):
        arena_real.grid_from([second, again], out)
    # a tie in agreement is a tie up to rounding: 0/259 and 3/259 against 1/259 and 2/259, smoothed over two points
    low, high = (0 / 259 + 3 / 259) / 2, (1 / 259 + 2 / 259) / 2
    assert low != high
    tied = [
        _seed_report(tmp_path / "t1.json", [("gkd", 1e-4, low, 1.9)]),
        _seed_report(tmp_path / "t2.json", [("gkd", 3e-4, high, 1.8)]),
    ]
    assert arena_real.grid_from(tied, str(tmp_path / "tied.json"))["best_lr"] == {"gkd": 3e-4}
    # a run keeps the commit it ran on when its report joined runs of several commits (--add-to)
    joined = json.loads(open(second).read())
    joined["runs"][0]["commit"] = "older"
    (tmp_path / "joined.json").write_text(json.dumps(joined))
    assert arena_real.grid_from([str(tmp_path / "joined.json")], out)["commits"] == ["def", "older"]
    # PATH:METHOD+METHOD takes only those runs of a report, and a method it does not have is an error
    with pytest.raises(SystemExit, match=r"has no run of \['gdk'\]"):
        arena_real.grid_from([second, f"{again}:gdk"], out)
    grid = arena_real.grid_from([second, f"{again}:sft"], out)
    assert grid["grid"]["sft"] == {"0.0001": 0.15, "0.0003": 0.01} and grid["grid"]["gkd"] == {"0.0001": 0.20}
    assert grid["sources"] == [second, f"{again}:sft"]
    other_warm_start = _seed_report(tmp_path / "d.json", [("gkd", 1e-3, 0.3, 1.0)], init_acc=0.25)
    with pytest.raises(SystemExit, match="another seed, setup or warm start"):
        arena_real.grid_from([first, other_warm_start], out)


def test_the_summary_pairs_kl_rouge_and_wall_clock_with_gkd_over_seeds(tmp_path):
    paths = [
        _seed_report(
            tmp_path / f"s{seed}.json",
            [("gkd", 1e-4, 0.10, 2.0), ("sft", 1e-4, 0.05, 2.5), ("npd", 1e-4, 0.10 + gain, 2.0 - gain), *extra],
            seed=seed,
            wall_s={"gkd": 40.0, "npd": 20.0},
        )
        for seed, gain, extra in ((1, 0.02, [("npd-topk", 1e-4, 0.2, 1.0)]), (2, 0.04, []), (3, 0.06, []))
    ]
    summary = arena_real.summarize_real(paths, str(tmp_path / "summary.json"))

    # a method not run on every seed is left out, and said so
    assert [row["method"] for row in summary["methods"]] == ["gkd", "sft", "npd"]
    assert summary["left_out"] == ["npd-topk"]

    npd = next(row for row in summary["methods"] if row["method"] == "npd")
    assert npd["minus_gkd"]["mean"] == pytest.approx(0.04)
    assert npd["kl_teacher_minus_gkd"]["mean"] == pytest.approx(-0.04)
    assert npd["kl_teacher_minus_gkd"]["lo"] < -0.04 < npd["kl_teacher_minus_gkd"]["hi"]
    assert npd["wall_vs_gkd"]["mean"] == pytest.approx(0.5)
    # smoothed over 2 checkpoints with the start's 3.0, its KL first reaches GKD's final 2.0 at its last checkpoint,
    # 20 s into GKD's 40
    assert npd["time_to_gkd_final_kl_vs_gkd_wall"] == [pytest.approx(0.5)] * 3
    assert json.load(open(tmp_path / "summary.json"))["methods"] == summary["methods"]
    assert npd["minus_sft"]["mean"] == pytest.approx(0.09)

    # without SFT on every seed, the pairing with SFT is left empty, not made up
    without_sft = _seed_report(tmp_path / "s4.json", [("gkd", 1e-4, 0.10, 2.0), ("npd", 1e-4, 0.2, 1.9)], seed=4)
    summary = arena_real.summarize_real([*paths, without_sft], str(tmp_path / "summary-4.json"))
    assert [row["method"] for row in summary["methods"]] == ["gkd", "npd"] and summary["left_out"] == [
        "npd-topk",
        "sft",
    ]
    assert all(row["minus_sft"] is None for row in summary["methods"])
    with pytest.raises(SystemExit, match="more than once"):  # e.g. the tuning seed's best runs and a seed-1 report
        arena_real.summarize_real([*paths, paths[0]], str(tmp_path / "summary-5.json"))
