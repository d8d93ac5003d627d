"""Is a reward in GRPO's regime on a model's sampled answers? From an evaluation record file with several samples per
problem (`trl-guided eval --num-samples 4 --temperature 1.0 --records ...`): per reward, the mean (of a maximum of
1), the share of problems whose samples do not all score the same (a group GRPO learns from), and the mean spread
(population standard deviation) within a problem's samples.

    python bench/instruction_regime.py RUN/regime.jsonl --out bench/instruction_regime.json
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from harness import emit

from trl_guided.evaluate import read_records


def regime(records: list[dict]) -> dict:
    """Per reward of the records: mean, share of groups with spread, mean within-group standard deviation."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name, value in record["rewards"].items():
            if value is not None:
                groups[name][record["problem_id"]].append(value)
    result = {}
    for name, by_problem in groups.items():
        values = [v for scores in by_problem.values() for v in scores]
        spreads = [statistics.pstdev(scores) for scores in by_problem.values() if len(scores) > 1]
        result[name] = {
            "mean": statistics.fmean(values),
            "groups": len(spreads),
            "groups_with_spread": sum(s > 0 for s in spreads) / len(spreads),
            "mean_within_group_std": statistics.fmean(spreads),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="an evaluation record file (.jsonl) with several samples per problem")
    parser.add_argument("--out", help="write the measures as JSON here")
    args = parser.parse_args(argv)
    records = read_records(args.records)
    result = {"records": args.records, "samples": len(records), "rewards": regime(records)}
    emit(result, args.out or "-")


if __name__ == "__main__":
    main()
