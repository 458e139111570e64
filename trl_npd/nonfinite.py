"""A NaN or infinite training loss: stop before it reaches the weights, and say which sample and which model.

The hot path pays one `isfinite` on each micro-batch's loss sum. transformers reads every micro-batch's loss back
anyway for its `logging_nan_inf_filter` (on by default), which hides a NaN loss from the logs but still lets its
gradients into the optimizer step; this check stops first. Only when that fails are the
culprits looked for: each sequence of the micro-batch goes alone through the student and the teacher, and the
ones whose logits are not finite at a trained position are named.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .batching import IGNORE_INDEX, Sequence
from .samples import Sample


class NonFiniteLossError(FloatingPointError):
    """A training loss was NaN or infinite; the message names the step, the micro-batch and the samples."""


def nonfinite_loss_message(
    loss: float,
    step: int,
    micro_batch: int,
    micro_batches: int,
    findings: list[str] | None,
) -> str:
    """The error message. `findings` is None when the samples could not be examined."""
    where = f"at training step {step} (micro-batch {micro_batch + 1} of {micro_batches})"
    text = (
        f"The training loss is {loss} {where}: training on it would make every weight NaN, so training stops here "
        "instead."
    )
    if findings is None:
        text += " The samples of this micro-batch could not be examined."
    elif findings:
        text += " Non-finite values at the trained positions of " + "; ".join(findings) + "."
    else:
        text += " Both models' logits are finite on every sample of this micro-batch: the loss itself overflowed."
    return text + (
        " Common causes: fp16 overflow (train in bf16 or fp32), a learning rate that made the student diverge, or "
        "a broken checkpoint."
    )


@torch.no_grad()
def find_nonfinite_samples(
    student: nn.Module,
    teacher: nn.Module,
    sequences: list[Sequence],
    samples: list[Sample] | None,
    device: torch.device,
) -> list[str]:
    """One line per sequence whose student or teacher logits (or stored teacher top-k log-probs) are not finite at
    a trained position, naming the sample, the model and what was found."""
    findings = []
    for index, sequence in enumerate(sequences):
        trained = torch.tensor(sequence.labels[1:], device=device) != IGNORE_INDEX  # position t predicts token t+1
        ids = torch.tensor([sequence.input_ids], device=device)
        problems = []
        for role, model in (("student", student), ("teacher", teacher)):
            if role == "teacher" and sequence.teacher_topk_logprobs is not None:  # scored by the generator
                stored = torch.tensor(sequence.teacher_topk_logprobs)
                bad = torch.isnan(stored) | (stored == math.inf)  # -inf is a log-prob of 0, which is fine
                if bad.any():
                    problems.append(
                        f"the teacher's stored top-k log-probs hold {_kinds(stored[bad])} at {int(bad.any(-1).sum())} "
                        f"of {len(stored)} completion tokens"
                    )
                continue
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1][trained]
            bad = ~torch.isfinite(logits)
            if bad.any():
                problems.append(
                    f"the {role}'s logits hold {_kinds(logits[bad])} at {int(bad.any(-1).sum())} of "
                    f"{int(trained.sum())} trained positions"
                )
        if problems:
            findings.append(f"{_name(index, samples)}: {', and '.join(problems)}")
    return findings


def _kinds(values: torch.Tensor) -> str:
    kinds = [name for name, found in (("nan", values.isnan()), ("inf", values.isinf())) if found.any()]
    return " and ".join(kinds)


def _name(index: int, samples: list[Sample] | None) -> str:
    if samples is None:
        return f"sample {index} of the micro-batch (a dataset completion)"
    sample = samples[index]
    return (
        f"sample {index} of the micro-batch (train dataset row {sample.prompt_index}, prompt stream position "
        f"{sample.stream_position}, policy version {sample.policy_version})"
    )
