"""The user docs hold to the code: every logged metric is documented, every link and anchor resolves, and no page
speaks of the project's issues by number."""

from __future__ import annotations

import re
from pathlib import Path

from trl_npd.config_doc import github_anchor
from trl_npd.metrics import NPDMetrics
from trl_npd.packing import PackingStats
from trl_npd.samples import GeneratedBatch, Rejected, Sample, TakeResult

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
METRICS_PAGE = ROOT / "docs" / "metrics.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def documented_metrics() -> set[str]:
    """The metric names in the first column of metrics.md's tables."""
    names = set()
    for line in METRICS_PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `npd/"):
            names |= set(re.findall(r"`(npd/\w+)`", line.split("|")[1]))
    return names


def metric_literals_in_the_code() -> set[str]:
    """Every complete `"npd/name"` string literal in trl_npd (prefixes such as `"npd/dropped_"` end in `_`)."""
    names = set()
    for path in (ROOT / "trl_npd").glob("*.py"):
        names |= set(re.findall(r"[\"'](npd/\w*[a-z])[\"']", path.read_text(encoding="utf-8")))
    return names


def sample(step: int) -> Sample:
    return Sample([1, 2], [3, 4], [-0.5, -0.5], policy_version=0, policy_step=step, prompt_index=0, stream_position=0)


def a_full_window() -> dict[str, float]:
    """One logging window in which everything the metrics observe happened at least once."""
    metrics = NPDMetrics()
    rejected = [Rejected(0, 0, 0, 0, reason) for reason in ("ifd_low", "ifd_high", "empty_prompt")]
    generated = GeneratedBatch([sample(0)], 1.0, 2, truncated_prompts=1, ifd_deltas=[0.1, 0.2], rejected=rejected)
    bootstrapped = GeneratedBatch([sample(0)], 1.0, 2, bootstrap=True)
    received = [generated, bootstrapped]
    take = TakeResult([sample(0)], stale=[sample(0)], empty=[sample(0)], wait_s=0.1, received=received)
    metrics.record_take(take, current_step=1)
    metrics.record_sample_drift([1], [0.01], [2])
    metrics.record_policy_kl(0.02, 2)
    metrics.record_packing(PackingStats(row_fill=0.9, pad_frac=0.1))
    metrics.record_sync(0.01, "drift", 1)
    return metrics.flush(version=1, buffer_size=4)


def test_the_metrics_page_lists_every_metric_the_code_logs():
    logged = metric_literals_in_the_code() | set(a_full_window())
    missing = logged - documented_metrics()
    assert not missing, f"metrics logged but not described in docs/metrics.md: {sorted(missing)}"


def test_the_metrics_page_lists_no_metric_the_code_does_not_log():
    logged = metric_literals_in_the_code() | set(a_full_window())
    unknown = documented_metrics() - logged
    assert not unknown, f"docs/metrics.md describes metrics nothing logs: {sorted(unknown)}"


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them (a repeated heading gets `-1`, `-2`, ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6} (.+)", line)):
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_page_speaks_of_issues_by_number():
    """Link targets (`design.md#21-...`) are anchors, not issue numbers, and are left out."""
    found = []
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"(?<![\w&])#\d+\b", LINK.sub("]()", line)):
                found.append(f"{page.name}:{number}: {line.strip()[:100]}")
    assert not found, "issue numbers in the docs:\n" + "\n".join(found)
