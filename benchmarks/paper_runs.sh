#!/usr/bin/env bash
# Keep the long paper-table runs across sessions: a session's processes end with it, and a new
# session's work tree has no git-ignored runs/. `save` stops every training run cleanly (SIGTERM:
# checkpoint written) and copies each run's state into benchmarks/paper/runs/ for git; `restore`
# copies it back into runs/ so that `--resume` continues exactly.
#
#   bash benchmarks/paper_runs.sh save      # end of a session, then commit benchmarks/paper/runs
#   bash benchmarks/paper_runs.sh restore   # start of a session, then resume (README there)
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=(last.pt best.pt config.json metrics.jsonl validation.jsonl eval.json eval-k4000.json eval-pt.json)

case "${1:-}" in
  save)
    pkill -TERM -f "paper_table.py train" || true
    pkill -TERM -f "qvae train" || true
    for _ in $(seq 60); do  # wait for the checkpoints to be written
      pgrep -f "paper_table.py train|qvae train" > /dev/null || break
      sleep 2
    done
    for dir in runs/paper/*/ runs/beat/*/; do
      [ -f "$dir/last.pt" ] || [ -f "$dir/best.pt" ] || continue  # a finished run keeps best.pt
      name=$(basename "$dir")
      case "$dir" in runs/beat/*) dest="benchmarks/paper/runs/beat-$name" ;;
                     *) dest="benchmarks/paper/runs/$name" ;; esac
      mkdir -p "$dest"
      for f in "${KEEP[@]}"; do
        [ -f "$dir/$f" ] && cp "$dir/$f" "$dest/"
      done
      echo "saved $dir -> $dest"
    done
    ;;
  restore)
    for dest in benchmarks/paper/runs/*/; do
      name=$(basename "$dest")
      case "$name" in beat-*) dir="runs/beat/${name#beat-}" ;; *) dir="runs/paper/$name" ;; esac
      mkdir -p "$dir"
      cp -n "$dest"* "$dir/" 2>/dev/null || true
      echo "restored $dest -> $dir"
    done
    ;;
  *)
    echo "usage: bash benchmarks/paper_runs.sh save|restore" >&2
    exit 2
    ;;
esac
