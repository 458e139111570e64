"""Peak memory and time of one distillation loss call (forward + backward): fused vs unfused.

    python benchmarks/loss_memory.py --out results/loss_memory.json

Each (implementation, tokens) pair runs in its own subprocess, so its peak resident memory (`ru_maxrss`) is its
own. The call is `loss.backward()` of the generalized JSD (beta=0.5) between a student head and a teacher head
applied to `(tokens, hidden)` states:
  - `unfused`: the reference path, `trl_npd.divergences.generalized_jsd_sum` on full `(tokens, vocab)` logits;
  - `fused`: `trl_npd.fused_jsd.fused_jsd_sum` (Liger's fused-linear JSD, eager);
  - `fused-compiled`: the same with `torch.compile` (the first call, which compiles, is not timed).
Each child caps its address space (`--mem-cap-gb`): an implementation that needs more reports `oom` instead of
waking the kernel's OOM killer. On CUDA, peaks come from `torch.cuda.max_memory_allocated` instead:

    python benchmarks/loss_memory.py --device cuda --vocab 151936 --tokens 8192 --out results/loss_memory-cuda.json

`--child-timeout` bounds each child: one that runs past it (a slow first compilation) is reported `timed out`, and
the others still run and are written.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time

from kit.child import hand_back, run_child
from kit.report import device_name, print_table, write_report

IMPLEMENTATIONS = ("unfused", "fused", "fused-compiled")
COLUMNS = [
    ("impl", "impl", ""),
    ("tokens", "tokens", "d"),
    ("peak_mb", "peak_mb", ".0f"),
    ("ms_per_call", "ms_per_call", ".0f"),
    ("vs unfused", "vs_unfused", ".3f"),
    ("status", "status", ""),
]


def child(impl: str, tokens: int, vocab: int, hidden: int, repeats: int, device: str) -> dict:
    import torch

    from trl_npd.divergences import generalized_jsd_sum
    from trl_npd.fused_jsd import fused_jsd_sum

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    student_head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False, device=device).requires_grad_(False)
    student_hidden = torch.randn(tokens, hidden, device=device, requires_grad=True)
    teacher_hidden = torch.randn(tokens, hidden, device=device)
    targets = torch.randint(0, vocab, (tokens,), device=device)

    def loss() -> torch.Tensor:
        if impl == "unfused":
            student_logits, teacher_logits = student_head(student_hidden)[None], teacher_head(teacher_hidden)[None]
            return generalized_jsd_sum(student_logits, teacher_logits, (targets >= 0)[None], 0.5)
        compiled = impl == "fused-compiled"
        return fused_jsd_sum(
            student_hidden, student_head, teacher_hidden, teacher_head, targets, 0.5, compiled=compiled
        )

    def call() -> None:
        student_head.zero_grad(set_to_none=True)
        student_hidden.grad = None
        loss().backward()
        if cuda:
            torch.cuda.synchronize()

    if impl == "fused-compiled":
        call()  # compilation, not timed
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    ms_per_call = (time.perf_counter() - start) / repeats * 1000
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb
    return {"peak_mb": peak_mb, "baseline_mb": baseline_mb, "ms_per_call": ms_per_call}


def run_one(impl: str, tokens: int, args: argparse.Namespace) -> dict:
    # the child parses this run's own flags, then its implementation and token count (argparse keeps the last)
    command = [sys.executable, __file__, *sys.argv[1:], "--child", impl, "--tokens", str(tokens)]
    row = {"impl": impl, "tokens": tokens, "peak_mb": None, "ms_per_call": None, "status": "ok"}
    try:
        done = run_child(command, timeout_s=args.child_timeout)
    except subprocess.TimeoutExpired:
        row["status"] = f"timed out (over --child-timeout {args.child_timeout:g} s)"
        return row
    if done.returncode == 0 and done.result is not None:
        row.update(done.result)
    elif done.returncode == 0:
        row["status"] = f"failed (the child handed nothing back): {done.stderr[-300:]}"
    elif args.device.startswith("cuda") and "out of memory" in done.stderr:
        row["status"] = "oom (CUDA out of memory)"
    elif "can't allocate memory" in done.stderr or "MemoryError" in done.stderr or "out of memory" in done.stderr:
        row["status"] = f"oom (over the {args.mem_cap_gb} GB cap)"
    else:
        row["status"] = f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/loss_memory.json")
    parser.add_argument("--tokens", default="1024,4096,8192")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--mem-cap-gb", type=float, default=20.0, help="address-space cap of a CPU child")
    parser.add_argument("--child-timeout", type=float, help="seconds each child may run (default: no limit)")
    parser.add_argument("--child", choices=IMPLEMENTATIONS)
    args = parser.parse_args()

    if args.child:
        if args.device == "cpu":
            cap = int(args.mem_cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        hand_back(child(args.child, int(args.tokens), args.vocab, args.hidden, args.repeats, args.device))
        return

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                f"loss_memory.py: --device {args.device} asks for CUDA, and this machine has none "
                "(torch.cuda.is_available() is False). Use --device cpu here."
            )
    rows = [run_one(impl, int(n), args) for n in args.tokens.split(",") for impl in args.impls.split(",")]
    report = {
        "benchmark": "loss_memory",
        "device": device_name() if args.device != "cpu" else f"cpu: {platform.machine()}, {os.cpu_count()} cores",
        "vocab": args.vocab,
        "hidden": args.hidden,
        "runs": rows,
    }
    write_report(report, args.out)
    unfused = {r["tokens"]: r["peak_mb"] for r in rows if r["impl"] == "unfused"}
    for r in rows:
        r["vs_unfused"] = r["peak_mb"] / unfused[r["tokens"]] if r["peak_mb"] and unfused.get(r["tokens"]) else None
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
