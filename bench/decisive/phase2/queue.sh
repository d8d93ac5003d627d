#!/usr/bin/env bash
# Phase 2's runs on one core, one after another, each only if its estimate ends before a deadline (a sitting ends with
# its finished runs committed: a run cut off by the end of a sitting would be lost).
#   bash bench/decisive/phase2/queue.sh CORE UNTIL_UTC ARM:SEED:MINUTES ...   (UNTIL_UTC as 2026-12-06T16:55:00Z)
set -u
core=$1 until=$(date -u -d "$2" +%s) here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
shift 2
for job in "$@"; do
  IFS=: read -r arm seed minutes <<< "$job"
  if [ $(( $(date -u +%s) + minutes * 60 )) -gt "$until" ]; then
    echo "$(date -u +%FT%TZ) skip $arm-s$seed: ~$minutes min would end after $(date -u -d @"$until" +%FT%TZ)"
    continue
  fi
  echo "$(date -u +%FT%TZ) start $arm-s$seed on core $core (~$minutes min)"
  bash "$here/run.sh" "$arm" "$seed" "$core"
  echo "$(date -u +%FT%TZ) $arm-s$seed exit $?"
done
