"""Append one job line to bench/decisive/ledger.jsonl: ledger.py WHAT COMMAND_FILE START_UTC END_UTC CORES [NOTE]"""
import json, sys
from datetime import datetime
what, command_file, start, end, cores = sys.argv[1:6]
note = sys.argv[6] if len(sys.argv) > 6 else ""
t = lambda s: datetime.strptime(s.strip(), "%Y-%m-%dT%H:%M:%SZ")
minutes = round((t(end) - t(start)).total_seconds() / 60, 1)
line = {"what": what, "command": open(command_file).read().strip(), "start_utc": start.strip(), "end_utc": end.strip(),
        "wall_minutes": minutes, "cores": cores, "note": note}
with open("/work/main/bench/decisive/ledger.jsonl", "a") as f:
    f.write(json.dumps(line) + "\n")
print(line)
