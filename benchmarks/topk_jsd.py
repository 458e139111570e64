"""Can GKD's generalized JSD be computed from the teacher's top-k plus a tail bucket, closely enough to replace it?

    python benchmarks/topk_jsd.py --out results/topk_jsd.json

The scoring stage can store the teacher's top-k log-probs with each sample, so the training step would need no
teacher forward. The full-vocabulary JSD needs the teacher's whole distribution; `divergences.topk_bucket_jsd`
takes it over k + 1 buckets (the top-k tokens and the tail), which is exact when the teacher spreads its tail mass
as the student does. This measures how far that is from the exact JSD, in loss and in the gradient on the student's
parameters, on the student's own samples (as on-policy training sees them), for two pairs of models:

- `random`: random-init Qwen3-shaped student and teacher (the throughput benchmark's cpu-tiny shapes): flat
  distributions, the worst case;
- `trained`: a smaller pair after a short supervised training on the toy arithmetic task, where both models are
  peaked, as real ones are.

Reported per pair, beta and k: the loss relative error (summed over tokens), the gradient's relative L2 error and
cosine, and the mean mass of the teacher outside its top-k.
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from kit.registry import PAIRS
from kit.report import device_name, print_table, write_report

from trl_npd.divergences import generalized_jsd_per_token, topk_bucket_jsd
from trl_npd.toy import arithmetic_example, build_tokenizer

PAIR_OF = {"random": "topk-random", "trained": "topk-trained"}  # kit/registry.py's pairs
KS = (1, 2, 5, 10, 20, 50, 100)
BETAS = (0.0, 0.5, 1.0)
COLUMNS = [
    ("pair", "pair", ""),
    ("beta", "beta", ".1f"),
    ("k", "k", "d"),
    ("tail mass", "teacher_tail_mass", ".4f"),
    ("loss err", "loss_rel_error", ".2%"),
    ("grad err", "grad_rel_error", ".2%"),
    ("grad cos", "grad_cosine", ".4f"),
]


def sharpen(model: Any, tokenizer: Any, steps: int, seed: int) -> None:
    """A short next-token training on the toy task's conversations, so the model's distributions are peaked."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        texts = [tokenizer.apply_chat_template(arithmetic_example(rng)["messages"], tokenize=False) for _ in range(32)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def student_samples(student: Any, tokenizer: Any, n: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` sampled completions of the toy prompts: (sequences, completion mask over the predicted positions)."""
    rng = random.Random(0)
    questions = [arithmetic_example(rng)["messages"][:1] for _ in range(n)]
    prompts = [tokenizer.apply_chat_template(q, tokenize=False, add_generation_prompt=True) for q in questions]
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    sequences = student.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id
    )
    mask = torch.zeros_like(sequences, dtype=torch.bool)
    mask[:, inputs["input_ids"].shape[1] :] = True
    mask &= sequences != tokenizer.pad_token_id
    return sequences, mask[:, 1:]


def compare(student: Any, teacher: Any, sequences: torch.Tensor, mask: torch.Tensor) -> list[dict[str, Any]]:
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(teacher(sequences).logits[:, :-1][mask].float(), dim=-1)
    params = [p for p in student.parameters() if p.requires_grad]

    def loss_and_grad(loss_fn: Any) -> tuple[float, torch.Tensor]:
        student_logprobs = torch.log_softmax(student(sequences).logits[:, :-1][mask].float(), dim=-1)
        loss = loss_fn(student_logprobs).sum()
        grads = torch.autograd.grad(loss, params)
        return loss.item(), torch.cat([g.flatten() for g in grads])

    rows = []
    for beta in BETAS:
        exact_loss, exact_grad = loss_and_grad(lambda s, b=beta: generalized_jsd_per_token(s, teacher_logprobs, b))
        for k in KS:
            top = teacher_logprobs.topk(k, dim=-1)
            loss, grad = loss_and_grad(lambda s, b=beta, t=top: topk_bucket_jsd(s, t.indices, t.values, b))
            rows.append(
                {
                    "beta": beta,
                    "k": k,
                    "exact_loss": exact_loss,
                    "loss_rel_error": abs(loss - exact_loss) / exact_loss,
                    "grad_rel_error": float((grad - exact_grad).norm() / exact_grad.norm()),
                    "grad_cosine": float(torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0)),
                    "teacher_tail_mass": float((1 - top.values.exp().sum(-1)).mean()),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/topk_jsd.json")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    pairs = {}
    for pair in ("random", "trained"):
        student, teacher = PAIRS[PAIR_OF[pair]].models(tokenizer)
        if pair == "trained":
            sharpen(teacher, tokenizer, args.train_steps, seed=2)
            sharpen(student, tokenizer, args.train_steps // 3, seed=1)  # a weaker student than the teacher
        sequences, mask = student_samples(student, tokenizer, args.samples, args.new_tokens)
        pairs[pair] = {"tokens": int(mask.sum()), "rows": compare(student, teacher, sequences, mask)}
    report = {"device": device_name(), "vocab": len(tokenizer), "train_steps": args.train_steps, "pairs": pairs}
    write_report(report, args.out)
    print_table([{"pair": pair, **row} for pair, result in pairs.items() for row in result["rows"]], COLUMNS)


if __name__ == "__main__":
    main()
