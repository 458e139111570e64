"""Packing under flash attention against the padded path: the loss, the log-probs and the gradients of the packed
batch trl_npd trains must equal those of each sample run alone.

    python benchmarks/packing_flash.py --device cuda --out results/packing_flash.json
    python benchmarks/packing_flash.py --device cpu --out results/packing_flash-cpu.json   # sdpa, float32

A small Qwen3-shaped student and teacher (`trl_npd.toy.build_model`) get an attention implementation. On CUDA they
run in bf16 with `flash_attention_2`, or `kernels-community/flash-attn` if that is the one that loads, or SDPA when
`--attn auto` finds no flash kernel; the report records which one ran. A batch of variable-length sequences goes
through trl_npd's own packing stage (`row_token_budget`, `pack_sequences`) and through the padded layout
(`pad_sequences`), and `trl_npd.losses.distillation_loss` (generalized JSD, `use_cache=False` as the trainer
calls it) runs on each. The reference is every sample alone, in a batch of one, with its losses and float32
gradients summed. Reported per packing case, for the packed and the padded batch against the reference:

- `loss_rel_err`: |loss - reference| / |reference| of the summed loss;
- `logprob_max_abs_err`: the largest difference of the student's log-prob of a trained token;
- `grad_rel_err`: ||g - g_ref|| / ||g_ref|| over all student parameters; `grad_max_abs_err` the largest entry of
  g - g_ref, over the largest |g_ref|.

Packing cases, two each run:

- the layout trl_npd trains (`row_token_budget`): under per-sample attention (flash) the whole micro-batch in one
  row (`one-row`), under a dense attention (SDPA, eager) rows capped at the longest sequence
  (`rows-capped-at-longest`). It must not leak: `pass`, else `fail` (or `inconclusive`, below).
- several rows of at most `--max-length` tokens, built with `pack_sequences` directly (`rows-of-max-length`; the
  batch must hold more than `--max-length` tokens, as the default does). Under flash attention a leak is the
  expected finding: transformers finds the samples in `position_ids` only in a batch of one row and runs several
  rows as plain causal rows whose samples see each other, which is why trl_npd trains one row. The case is then
  `expected leak` when the leak is seen, and `no leak, unexpected` when it is not (transformers may have learned
  to unpack several rows); both are findings (`findings` in the JSON), not failures of trl_npd. Under SDPA and
  eager, whose masks follow each row's `position_ids`, several rows do not leak: that expectation is checked like
  the trained layout's.

A no-leak check passes when both the packed and the padded layout stay within the tolerance of the dtype. It is
`inconclusive` when the same packed batch with its sample boundaries removed (positions running on across a row, so
the samples attend to each other) lands within the tolerance too: a check that cannot see a leak proves nothing.
Exit status: 0 when every case passes (`expected leak` and `no leak, unexpected` count as passing), 1 otherwise (a
`fail`, or an `inconclusive` case), 3 when the asked attention implementation cannot be loaded (the JSON says why).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
from typing import Any

from kit.report import device_name, write_report

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

UNAVAILABLE_EXIT = 3
FLASH = ("flash_attention_2", "kernels-community/flash-attn")
ATTENTION_CHOICES = ("auto", "flash", *FLASH, "sdpa", "eager")
# per dtype: the student's per-token log-probs (absolute), the summed loss and the gradient norm (relative). bf16
# keeps 8 bits of mantissa, so a sample alone and in a batch differ by the kernels' tiling alone: on CPU (SDPA, 12
# sequences of 16-200 tokens, the default model) up to 4.4e-3 in a log-prob, 2.3e-3 in the loss (reference path)
# and 5e-3 in the gradient, where removing the boundaries moved a log-prob by 1.1. The bf16 limits leave about 10x.
TOLERANCES = {
    "float32": {"logprob_max_abs_err": 1e-4, "loss_rel_err": 1e-5, "grad_rel_err": 1e-4},
    "bfloat16": {"logprob_max_abs_err": 0.05, "loss_rel_err": 1e-2, "grad_rel_err": 3e-2},
}


def candidates(requested: str, device: str) -> list[str]:
    """Attention implementations to try, in order."""
    if requested == "flash":
        return list(FLASH)
    if requested == "auto":
        return [*FLASH, "sdpa"] if device == "cuda" else ["sdpa"]
    return [requested]


def set_attention(models: list[Any], requested: str, device: str) -> tuple[str | None, list[dict[str, str]]]:
    """The first implementation from `candidates` that every model accepts, and why the ones before it failed."""
    failures = []
    for name in candidates(requested, device):
        try:
            for model in models:
                model.set_attn_implementation(name)
        except Exception as error:  # ImportError, ValueError, hub errors offline: each is a reason to report
            failures.append({"attn_implementation": name, "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        return name, failures
    return None, failures


def random_sequences(lengths: list[int], vocab: int, seed: int) -> list[Any]:
    """Sequences of random tokens, trained on all but their first quarter (the "prompt")."""
    from trl_npd.batching import IGNORE_INDEX, Sequence

    rng = random.Random(seed)
    sequences = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = max(1, n // 4)
        sequences.append(Sequence(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return sequences


def trained_tokens(sequence: Any) -> int:
    """Positions the loss is taken over, after the causal shift (a packed row masks each sample's first label)."""
    return sum(label != -100 for label in sequence.labels[1:])


def run_batch(
    student: Any, teacher: Any, batch: dict[str, Any], beta: float, fused: bool, backward: bool
) -> dict[str, Any]:
    """Loss, token count, the student's log-probs of the trained tokens (in the batch's row-major order) and float32
    gradients of one `distillation_loss` call."""
    import torch

    from trl_npd.losses import distillation_loss

    device = next(student.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    student.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        result = distillation_loss(student, teacher, batch, beta, fused=fused, logprob_temperature=1.0)
    grads = None
    if backward:
        result.loss_sum.backward()
        grads = {n: p.grad.float() for n, p in student.named_parameters() if p.grad is not None}
    return {
        "loss": float(result.loss_sum.detach().float()),
        "tokens": int(result.num_tokens),
        "logprobs": result.current_logprobs.detach().float().cpu(),
        "grads": grads,
    }


def reference(student: Any, teacher: Any, sequences: list[Any], pad: int, beta: float, fused: bool) -> dict[str, Any]:
    """Every sample alone: summed losses, summed float32 gradients, log-probs in sample order."""
    from trl_npd.batching import pad_sequences

    loss, tokens, logprobs, grads = 0.0, 0, [], {}
    for sequence in sequences:
        alone = run_batch(student, teacher, pad_sequences([sequence], pad), beta, fused, backward=True)
        loss += alone["loss"]
        tokens += alone["tokens"]
        logprobs.append(alone["logprobs"])
        for name, grad in alone["grads"].items():
            grads[name] = grads[name] + grad if name in grads else grad.clone()
    import torch

    return {"loss": loss, "tokens": tokens, "logprobs": torch.cat(logprobs), "grads": grads}


def in_sample_order(logprobs: Any, sequences: list[Any], order: list[int]) -> Any:
    """Log-probs laid out in `order` (the sequences' order in the batch, row by row) put back in sample order."""
    import torch

    pieces, start = {}, 0
    for index in order:
        n = trained_tokens(sequences[index])
        pieces[index] = logprobs[start : start + n]
        start += n
    assert start == len(logprobs), (start, len(logprobs))
    return torch.cat([pieces[i] for i in range(len(sequences))])


def errors(result: dict[str, Any], ref: dict[str, Any], logprobs: Any) -> dict[str, float]:
    import torch

    out = {
        "loss": result["loss"],
        "loss_rel_err": abs(result["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12),
        "logprob_max_abs_err": float((logprobs - ref["logprobs"]).abs().max()),
    }
    if result["grads"] is not None:
        names = sorted(ref["grads"])
        diff = torch.cat([(result["grads"][n] - ref["grads"][n]).flatten() for n in names])
        norm = torch.cat([ref["grads"][n].flatten() for n in names])
        out["grad_rel_err"] = float(diff.norm() / norm.norm().clamp_min(1e-30))
        out["grad_max_abs_err"] = float(diff.abs().max() / norm.abs().max().clamp_min(1e-30))
    return out


def check_case(
    name: str,
    budget: int,
    layout: str,
    flash: bool,
    models: tuple[Any, Any],
    sequences: list[Any],
    ref: dict[str, Any],
    args: argparse.Namespace,
    tolerance: dict[str, float],
    pad: int,
) -> dict[str, Any]:
    import torch

    from trl_npd.batching import pad_sequences
    from trl_npd.packing import first_fit_decreasing, pack_sequences

    student, teacher = models
    lengths = [len(s.input_ids) for s in sequences]
    packed, stats = pack_sequences(sequences, budget, pad)
    # pack_sequences lays rows out as first_fit_decreasing groups them: that is the order of the trained tokens
    order = [index for row in first_fit_decreasing(lengths, budget) for index in row]
    if args.inject_leak:  # positions run on across each row: the samples of a row see each other
        packed["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]).clone()
    padded = pad_sequences(sequences, pad)
    fused = args.loss == "fused"
    packed_result = run_batch(student, teacher, packed, args.beta, fused, backward=True)
    padded_result = run_batch(student, teacher, padded, args.beta, fused, backward=True)
    leaky = dict(packed)
    leaky["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]).clone()
    leak_result = run_batch(student, teacher, leaky, args.beta, fused, backward=False)
    rows = packed["input_ids"].shape[0]
    # transformers unpacks the samples of a packed batch under flash attention only when it has a single row
    expect_leak = flash and rows > 1
    row = {
        "case": name,
        "layout": layout,
        "expect": "leak" if expect_leak else "no leak",
        "row_budget": budget,
        "rows": rows,
        "packed_shape": list(packed["input_ids"].shape),
        "padded_shape": list(padded["input_ids"].shape),
        "row_fill": stats.row_fill,
        "tokens": {"packed": packed_result["tokens"], "padded": padded_result["tokens"], "reference": ref["tokens"]},
        "packed": errors(packed_result, ref, in_sample_order(packed_result["logprobs"], sequences, order)),
        "padded": errors(padded_result, ref, padded_result["logprobs"]),
        "boundaries_removed": errors(leak_result, ref, in_sample_order(leak_result["logprobs"], sequences, order)),
    }
    same_tokens = len(set(row["tokens"].values())) == 1
    padded_within = all(row["padded"][key] <= limit for key, limit in tolerance.items())
    packed_within = all(row["packed"][key] <= limit for key, limit in tolerance.items())
    # the check sees a leak if removing the boundaries moves the log-probs or the loss past the tolerance
    row["leak_detectable"] = (
        row["boundaries_removed"]["logprob_max_abs_err"] > tolerance["logprob_max_abs_err"]
        or row["boundaries_removed"]["loss_rel_err"] > tolerance["loss_rel_err"]
    )
    if not (same_tokens and padded_within):  # the reference or the padded path is off: nothing to conclude
        row["status"] = "fail"
    elif expect_leak:  # several rows under flash attention: a finding either way, not a failure of trl_npd
        if not packed_within:
            row["status"] = "expected leak"
        else:
            row["status"] = "no leak, unexpected" if row["leak_detectable"] else "inconclusive"
    elif not packed_within:
        row["status"] = "fail"
    else:
        row["status"] = "pass" if row["leak_detectable"] else "inconclusive"
    return row


def cases(lengths: list[int], max_length: int, per_sample: bool) -> list[tuple[str, int, str]]:
    """(name, row budget, layout) of each packing case: the layout trl_npd trains (`row_token_budget`), then rows of
    at most `max_length` tokens."""
    from trl_npd.packing import row_token_budget

    budget = row_token_budget(lengths, max_length, per_sample)
    trained = ("one-row" if per_sample else "rows-capped-at-longest", budget, "trained")
    return [trained, ("rows-of-max-length", max_length, "several rows")]


PASSING = ("pass", "expected leak", "no leak, unexpected")


def finding(row: dict[str, Any], flash: bool) -> str | None:
    """What a several-rows case under flash attention found, in a sentence."""
    e = row["packed"]
    if flash and row["layout"] == "several rows" and row["rows"] == 1:
        return (
            f"{row['case']}: the batch fits one row of {row['row_budget']} tokens, so several rows were not checked "
            "(pass a --max-length below the batch's tokens)"
        )
    if row["status"] == "expected leak":
        return (
            f"{row['case']}: {row['rows']} rows leak under flash attention as expected (log-prob error "
            f"{e['logprob_max_abs_err']:.2g}, loss {e['loss_rel_err']:.2g}): transformers unpacks only a single row, "
            "which is why trl_npd packs a micro-batch into one"
        )
    if row["status"] == "no leak, unexpected":
        return (
            f"{row['case']}: {row['rows']} rows did NOT leak under flash attention (log-prob error "
            f"{e['logprob_max_abs_err']:.2g}): transformers may now unpack several rows; row_token_budget's one-row "
            "rule could be revisited"
        )
    return None


def print_table(report: dict[str, Any]) -> None:
    print(
        f"attention: {report['attn_implementation']} ({report['dtype']}, {report['device']}); "
        f"{len(report['lengths'])} sequences, {sum(report['lengths'])} tokens; loss: {report['loss']}"
    )
    print(
        f"{'case':24} {'layout':18} {'shape':>9} {'loss rel':>9} {'logprob abs':>11} {'grad rel':>9} "
        f"{'grad max':>9}  status"
    )
    tolerance = report["tolerance"]
    print(
        f"{'tolerance':24} {'':18} {'':>9} {tolerance['loss_rel_err']:9.1e} {tolerance['logprob_max_abs_err']:11.1e} "
        f"{tolerance['grad_rel_err']:9.1e} {'':>9}"
    )
    for row in report["cases"]:
        for layout in ("packed", "padded", "boundaries_removed"):
            e = row[layout]
            shape = "x".join(map(str, row["padded_shape" if layout == "padded" else "packed_shape"]))
            grad_rel = f"{e['grad_rel_err']:9.1e}" if "grad_rel_err" in e else f"{'-':>9}"
            grad_max = f"{e['grad_max_abs_err']:9.1e}" if "grad_max_abs_err" in e else f"{'-':>9}"
            status = row["status"] if layout == "packed" else ""
            if layout == "boundaries_removed":
                status = "(a leak: detectable)" if row["leak_detectable"] else "(a leak: NOT detectable)"
            print(
                f"{row['case']:24} {layout:18} {shape:>9} {e['loss_rel_err']:9.1e} {e['logprob_max_abs_err']:11.1e} "
                f"{grad_rel} {grad_max}  {status}"
            )
    for text in report["findings"]:
        print(f"finding: {text}")
    print(f"overall: {report['status']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--attn", choices=ATTENTION_CHOICES, default="auto", help="flash: a flash kernel or exit 3")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on CUDA")
    parser.add_argument("--loss", choices=("fused", "reference"), default="fused", help="the trainer's default: fused")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--max-length", type=int, default=1024, help="rows-of-max-length's row budget")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol-scale", type=float, default=1.0, help="multiply every tolerance by this")
    parser.add_argument("--out", default="results/packing_flash.json")
    parser.add_argument("--inject-leak", action="store_true", help=argparse.SUPPRESS)  # tests: the check must fail
    args = parser.parse_args()
    if not 1 <= args.min_len <= args.max_len or args.samples < 2:
        parser.error("need --samples >= 2 and 1 <= --min-len <= --max-len")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "packing_flash.py: no CUDA device (torch.cuda.is_available() is False). It checks flash attention on a "
            "GPU; pass --device cpu for the same check with SDPA/eager in float32."
        )
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    from trl_npd.packing import attends_per_sample
    from trl_npd.toy import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    shape = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads)
    student = build_model(tokenizer, seed=1, **shape).to(args.device, dtype).train()
    teacher = build_model(tokenizer, seed=2, **shape).to(args.device, dtype).eval()
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.samples)]
    report: dict[str, Any] = {
        "benchmark": "packing_flash",
        "device": device_name() if args.device == "cuda" else f"cpu ({device_name()})",
        "date": datetime.date.today().isoformat(),
        "dtype": dtype_name,
        "attn_requested": args.attn,
        "loss": args.loss,
        "model": {**shape, "head_dim": args.hidden // args.heads, "vocab": len(tokenizer)},
        "lengths": lengths,
        "max_length": args.max_length,
    }
    name, failures = set_attention([student, teacher], args.attn, args.device)
    report |= {"attn_implementation": name, "attn_failures": failures}
    if name is None:
        reason = "; ".join(f"{f['attn_implementation']}: {f['error']}" for f in failures)
        write_report({**report, "status": "unavailable", "reason": reason}, args.out)
        print(f"UNAVAILABLE: no attention implementation of {candidates(args.attn, args.device)} loads: {reason}")
        sys.exit(UNAVAILABLE_EXIT)
    tolerance = {k: v * args.tol_scale for k, v in TOLERANCES[dtype_name].items()}
    per_sample = attends_per_sample(student) and attends_per_sample(teacher)
    sequences = random_sequences(lengths, len(tokenizer), args.seed)
    pad = tokenizer.pad_token_id
    ref = reference(student, teacher, sequences, pad, args.beta, args.loss == "fused")
    flash = "flash" in name  # flash_attention_2, kernels-community/flash-attn: unpacks a single row only
    rows = [
        check_case(case, budget, layout, flash, (student, teacher), sequences, ref, args, tolerance, pad)
        for case, budget, layout in cases(lengths, args.max_length, per_sample)
    ]
    statuses = {row["status"] for row in rows}
    status = "pass" if statuses <= set(PASSING) else "fail" if "fail" in statuses else "inconclusive"
    findings = [text for row in rows if (text := finding(row, flash))]
    report |= {"per_sample_attention": per_sample, "flash": flash, "tolerance": tolerance, "cases": rows}
    report |= {"findings": findings, "status": status}
    if args.device == "cuda":
        report["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    write_report(report, args.out)
    print_table(report)
    sys.exit(0 if status == "pass" else 1)


if __name__ == "__main__":
    main()
