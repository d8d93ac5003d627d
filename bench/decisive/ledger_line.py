"""Append one job's line to the decisive study's ledger (bench/decisive/ledger.jsonl).

Usage: ledger_line.py WHAT COMMAND_FILE START_UTC END_UTC CORES [NOTE]; the times as 2026-12-06T14:00:00Z."""

import json
import sys
from datetime import datetime
from pathlib import Path

LEDGER = Path(__file__).parent / "ledger.jsonl"


def minutes_between(start: str, end: str) -> float:
    def parse(moment):
        return datetime.strptime(moment.strip(), "%Y-%m-%dT%H:%M:%SZ")

    return round((parse(end) - parse(start)).total_seconds() / 60, 1)


def main(argv: list[str]) -> None:
    what, command_file, start, end, cores = argv[:5]
    line = {
        "what": what,
        "command": Path(command_file).read_text().strip(),
        "start_utc": start.strip(),
        "end_utc": end.strip(),
        "wall_minutes": minutes_between(start, end),
        "cores": cores,
        "note": argv[5] if len(argv) > 5 else "",
    }
    with open(LEDGER, "a") as handle:
        handle.write(json.dumps(line) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main(sys.argv[1:])
