import math
import random

import pytest
import torch

from trl_npd.samples import Sample
from trl_npd.scoring import SampleScorer
from trl_npd.selection import MIN_TAILS_WINDOW, MIN_UNCONDITIONAL_NLL, DeltaIFDFilter, DeltaIFDSettings, delta_ifd, ifd
from trl_npd.toy import build_model


def test_band_edges_are_inclusive_and_drops_are_counted_by_side():
    selector = DeltaIFDFilter(DeltaIFDSettings("absolute", 0.0, 0.8))
    result = selector.select([-1e-9, 0.0, 0.4, 0.8, 0.8 + 1e-9, math.nan])
    assert result.kept == [1, 2, 3, 5]  # both edges kept; an undefined Δ is kept
    assert result.dropped == {"ifd_low": 1, "ifd_high": 1}


def test_the_tails_band_drops_only_extreme_outliers_of_either_sign_and_never_cuts_by_sign():
    rng = random.Random(0)
    selector = DeltaIFDFilter(DeltaIFDSettings("tails", tail_width=3.5, max_drop_frac=0.05, window=1024))
    # before the window can say what is extreme, nothing is dropped, however far out
    early = selector.select([rng.gauss(0, 0.1) for _ in range(MIN_TAILS_WINDOW - 2)] + [50.0])
    assert early.dropped == {}
    # Δ centred on 0, both signs: a sign cut would drop half; the tails band keeps both sides...
    centred = selector.select([rng.gauss(0.0, 0.1) for _ in range(2000)])
    assert sum(centred.dropped.values()) < 0.01 * 2000
    # ...and drops what sits far out on either side, counted by side, with each rejected index and reason
    result = selector.select([0.0, 0.05, -0.05, 3.0, -3.0])
    assert result.kept == [0, 1, 2]
    assert result.dropped == {"ifd_high": 1, "ifd_low": 1}
    assert result.rejected == [(3, "ifd_high"), (4, "ifd_low")]


def test_the_tails_band_never_drops_more_than_its_bound_of_heavy_tailed_deltas():
    rng = random.Random(1)
    selector = DeltaIFDFilter(DeltaIFDSettings("tails", tail_width=3.5, max_drop_frac=0.05, window=1024))
    # a Cauchy-like Δ: its MAD is small against its tails, so the robust band alone would drop about 12%
    deltas = [math.tan(math.pi * (rng.random() - 0.5)) for _ in range(4000)]
    dropped = sum(sum(selector.select(deltas[i : i + 16]).dropped.values()) for i in range(0, 4000, 16))
    assert 0.02 * 4000 < dropped <= 0.06 * 4000  # the bound holds up to the window's sampling noise


def test_ifd_never_divides_by_zero():
    assert ifd(0.5, 0.0) == 0.5 / MIN_UNCONDITIONAL_NLL
    assert delta_ifd(1.0, 2.0, 0.3, 0.6) == pytest.approx(0.0)
    assert delta_ifd(2.0, 2.0, 0.5, 1.0) == pytest.approx(0.5)


def test_quantile_band_keeps_the_middle_of_recent_deltas():
    selector = DeltaIFDFilter(DeltaIFDSettings("quantile", quantiles=(0.1, 0.9), window=100))
    result = selector.select([float(i) for i in range(11)])  # quantiles of 0..10: [1, 9]
    assert result.kept == list(range(1, 10))
    assert result.dropped == {"ifd_low": 1, "ifd_high": 1}


def test_rejecting_everything_warns_with_the_distribution_and_widens_to_the_quantile_band():
    selector = DeltaIFDFilter(DeltaIFDSettings("absolute", 0.0, 0.8, quantiles=(0.2, 0.8), max_rejected_in_a_row=5))
    result = selector.select([5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0])
    assert len(result.warnings) == 1
    assert "[0.0, 0.8]" in result.warnings[0] and "p50=" in result.warnings[0]
    assert selector.band == "quantile"
    later = selector.select([6.5, 100.0])
    assert later.kept == [0]  # inside the quantile band of what was observed; 100 is still out


def make_sample(prompt, completion, logprobs_t1):
    return Sample(
        prompt_ids=prompt,
        completion_ids=completion,
        behaviour_logprobs=logprobs_t1,
        behaviour_logprobs_t1=logprobs_t1,
        policy_version=0,
        policy_step=0,
        prompt_index=0,
        stream_position=0,
    )


def mean_nll(model, context, tokens):
    ids = torch.tensor([context + tokens])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0]
    lps = torch.log_softmax(logits[len(context) - 1 : -1], -1).gather(1, torch.tensor(tokens)[:, None])
    return -lps.mean().item()


@pytest.mark.parametrize("bos", [None, 1])
def test_scored_delta_equals_the_formula_on_nlls_computed_by_hand(tokenizer, bos):
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1).eval()
    teacher = build_model(tokenizer, hidden_size=48, num_layers=2, seed=2).eval()
    prompt, completion = [5, 17, 42, 9], [33, 71, 12, 8, 64]
    student_lps = torch.log_softmax(student(torch.tensor([prompt + completion])).logits[0], -1)
    t1 = student_lps[len(prompt) - 1 : -1].gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()
    sample = make_sample(prompt, completion, t1)
    SampleScorer(teacher, student=student, ifd=True, bos_token_id=bos).score([sample])

    start = [] if bos is None else [bos]
    scored = completion if bos is not None else completion[1:]  # without BOS the first token has no context
    context = start + ([] if bos is not None else completion[:1])
    expected = (mean_nll(teacher, prompt, completion) / mean_nll(teacher, context, scored)) - (
        mean_nll(student, prompt, completion) / mean_nll(student, context, scored)
    )
    assert sample.ifd_delta == pytest.approx(expected, rel=1e-4)


def test_a_one_token_completion_without_bos_has_an_undefined_delta_not_a_nan_crash(tokenizer):
    student = build_model(tokenizer, hidden_size=32, num_layers=1, seed=1)
    teacher = build_model(tokenizer, hidden_size=48, num_layers=1, seed=2)
    without_bos = make_sample([5, 6], [7], [-1.0])
    with_bos = make_sample([5, 6], [7], [-1.0])
    SampleScorer(teacher, student=student, ifd=True, bos_token_id=None).score([without_bos])
    SampleScorer(teacher, student=student, ifd=True, bos_token_id=1).score([with_bos])
    assert math.isnan(without_bos.ifd_delta)  # nothing to score without the prompt: kept, counted as undefined
    assert math.isfinite(with_bos.ifd_delta)


def test_an_empty_completion_has_an_undefined_delta(tokenizer):
    """generate() always returns at least one token, but the scorer must not crash or divide by zero on none."""
    student = build_model(tokenizer, hidden_size=32, num_layers=1, seed=1)
    teacher = build_model(tokenizer, hidden_size=48, num_layers=1, seed=2)
    empty = make_sample([5, 6], [], [])
    SampleScorer(teacher, student=student, ifd=True, bos_token_id=1).score([empty])
    assert math.isnan(empty.ifd_delta)
