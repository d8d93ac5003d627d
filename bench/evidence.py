"""Defaults follow the evidence: which guided configuration the study reports (bench/learning.py's JSON) make the
default.

    python bench/evidence.py bench/learning.json bench/learning_regime.json

The rule (docs/training.md): a configuration is an arm's overlay (its learning rate apart: each arm runs at its own
tuned rate). Of the guided configurations that every given study holds, the one whose difference to plain GRPO has
the best lower 95 % CI bound (the worst bound over the studies) wins, when that bound is above zero (it beats plain
GRPO in every study). If none does, the one that loses least wins: the best worst-case mean difference to plain GRPO
(ties: the better bound). Plain GRPO itself is never the answer: the plugin's defaults are for `guidance: true`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IGNORED = ("learning_rate",)  # tuned per arm and study: not part of a configuration


def configuration(overrides: dict) -> str:
    """A configuration's name: its overlay without the learning rate, keys sorted."""
    return json.dumps({k: v for k, v in sorted(overrides.items()) if k not in IGNORED}, sort_keys=True)


def difference_to_plain(report: dict, arm: str) -> tuple[float, list[float]] | None:
    """(mean difference arm - plain, its 95 % CI) from an arm entry, or from the pairs of an older report."""
    entry = report["arms"][arm]
    if "difference_to_plain" in entry:
        return entry["difference_to_plain"], list(entry["difference_to_plain_ci95"])
    pair = report.get("pairs", {}).get(f"plain - {arm}")
    if pair is None:
        return None
    return -pair["difference"], [-pair["ci95"][1], -pair["ci95"][0]]


def rule_winner(studies: dict[str, dict], require_all: bool = True) -> dict:
    """The rule's winner over `studies` (study name -> report). Returns the winner's overrides, its worst-case lower
    bound and mean difference to plain GRPO, whether it beats plain GRPO, the arm that ran it in each study, and the
    ranking of every candidate."""
    candidates: dict[str, dict] = {}
    for study, report in studies.items():
        for arm, entry in report["arms"].items():
            overrides = entry.get("overrides") or {}
            if not overrides.get("guidance") or not entry.get("seeds"):
                continue
            difference = difference_to_plain(report, arm)
            if difference is None:
                continue
            key = configuration(overrides)
            candidate = candidates.setdefault(key, {"overrides": json.loads(key), "arms": {}, "per_study": {}})
            candidate["arms"][study] = arm
            candidate["per_study"][study] = {"difference": difference[0], "ci95": difference[1]}
    if require_all:
        candidates = {k: c for k, c in candidates.items() if set(c["per_study"]) == set(studies)}
    if not candidates:
        raise ValueError(
            "no guided configuration with a difference to plain GRPO is in every study given"
            if require_all
            else "no guided arm with a difference to plain GRPO in the studies given"
        )
    for candidate in candidates.values():
        candidate["lower_bound"] = min(s["ci95"][0] for s in candidate["per_study"].values())
        candidate["difference"] = min(s["difference"] for s in candidate["per_study"].values())
        candidate["beats_plain"] = candidate["lower_bound"] > 0
    ranked = list(candidates.values())
    if any(c["beats_plain"] for c in ranked):
        ranked.sort(key=lambda c: (-c["lower_bound"], -c["difference"], configuration(c["overrides"])))
        rule = "best lower CI bound of the difference to plain GRPO (above zero in every study)"
    else:
        ranked.sort(key=lambda c: (-c["difference"], -c["lower_bound"], configuration(c["overrides"])))
        rule = "no configuration beats plain GRPO: the one that loses least (best worst-case mean difference)"
    return {"winner": ranked[0], "beats_plain": ranked[0]["beats_plain"], "rule": rule, "ranking": ranked}


def default_mismatches(overrides: dict, config) -> dict:
    """Fields of the winner's overlay whose value `config` (e.g. a default GuidedGRPOConfig) does not have:
    field -> (config's value, the winner's)."""
    return {
        key: (getattr(config, key, None), value)
        for key, value in overrides.items()
        if key not in IGNORED and getattr(config, key, None) != value
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="Study reports (bench/learning.py's JSON).")
    parser.add_argument("--any-study", action="store_true", help="Also rank configurations missing from a study.")
    args = parser.parse_args(argv)
    studies = {Path(path).stem: json.loads(Path(path).read_text()) for path in args.reports}
    try:
        result = rule_winner(studies, require_all=not args.any_study)
    except ValueError as error:
        sys.exit(f"[evidence] {error}")
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
