"""What a distilled model's card says about how it was distilled: the teacher, the NPD settings, the citations.

TRL's card (tags, base model, the GKD citation) is written first by `create_model_card`; this section follows it.
"""

from __future__ import annotations

import os
from typing import Any

# The arXiv identifier is what DESIGN.md cites; the author list was not available offline, so the entry names the
# method and points at the paper rather than inventing authors.
NPD_CITATION = """\
@misc{npd2026,
    title         = {{Near-Policy Distillation}},
    eprint        = {2605.05940},
    archivePrefix = {arXiv},
    year          = 2026,
    url           = {https://arxiv.org/abs/2605.05940},
}"""


def teacher_name(teacher: Any) -> str:
    """The teacher's Hub id or path, as loaded; `a local model` when it was built in memory."""
    config = getattr(teacher, "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    return name or f"a local model ({type(teacher).__name__})"


def objective(args: Any) -> str:
    if args.teacher_top_k is not None:
        return (
            f"NPD top-k: {args.ce_weight:g} × cross-entropy + {1 - args.ce_weight:g} × KL(teacher ‖ student) over the "
            f"teacher's top-{args.teacher_top_k} tokens and a tail bucket"
        )
    return f"generalized Jensen-Shannon divergence, β = {args.beta:g} (GKD's loss)"


def ifd_band(args: Any) -> str:
    if not args.ifd_filter:
        return "off"
    if args.ifd_band == "quantile":
        low, high = args.ifd_quantiles
        return f"quantile band [{low:g}, {high:g}] over the last {args.ifd_window} samples"
    return f"absolute band [{args.ifd_delta_min:g}, {args.ifd_delta_max:g}]"


def npd_section(args: Any, teacher: Any) -> str:
    """The markdown section appended to TRL's model card."""
    rows = [
        ("teacher", f"`{teacher_name(teacher)}`"),
        ("objective", objective(args)),
        ("on-policy fraction (`lmbda`)", f"{args.lmbda:g}"),
        ("weight sync interval (`weight_sync_steps`)", f"{args.weight_sync_steps} optimizer steps"),
        ("staleness bound (`max_staleness`)", f"{args.max_staleness} optimizer steps"),
        ("drift refresh (`max_policy_kl`)", "off" if args.max_policy_kl is None else f"{args.max_policy_kl:g}"),
        ("Δ-IFD selection", ifd_band(args)),
        ("sampling", f"temperature {args.temperature:g}, up to {args.max_new_tokens} new tokens"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""
## Distillation

This model was distilled with trl_npd's `NearPolicyDistillTrainer`
(Near-Policy Distillation on top of TRL's GKD): the student's samples come from a background generator whose
weights are refreshed every few optimizer steps, and samples older than the staleness bound are never trained on.

| setting | value |
|---|---|
{table}

### Cite Near-Policy Distillation as:

```bibtex
{NPD_CITATION}
```

GKD, whose trainer and loss this builds on, is cited above.
"""


def append_npd_section(output_dir: str, args: Any, teacher: Any) -> None:
    """Add the section to the card in `output_dir` once; a folder without a card gets one with the NPD tags."""
    path = os.path.join(output_dir, "README.md")
    card = "---\ntags:\n- trl\n- trl-npd\n- distillation\n---\n"
    if os.path.isfile(path):
        with open(path) as f:
            card = f.read()
    if "\n## Distillation\n" in card:
        return
    with open(path, "w") as f:
        f.write(card.rstrip() + "\n" + npd_section(args, teacher))


def document_save(trainer: Any, target: str) -> None:
    """After a final save to `target`: in the output folder, TRL's card (as a push would write it) with the NPD
    section; elsewhere, the NPD section added to the card the save wrote there (PEFT's, with its metadata), or a new
    one."""
    if os.path.abspath(target) == os.path.abspath(trainer.args.output_dir):
        trainer.create_model_card()
    else:
        append_npd_section(target, trainer.args, trainer.accelerator.unwrap_model(trainer.teacher_model))
