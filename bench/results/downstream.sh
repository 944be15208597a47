#!/usr/bin/env bash
# The downstream half of docs/results.md, run from the repository root through the studio's own queue
# (`mediswift sweep ... --wait`; the Queue and Study tabs show the same sweeps):
#   bash bench/results/downstream.sh [DB]                         (default DB: results/runs.db)
#   PARENTS="ID_DENSE ID_50 ID_75" bash bench/results/downstream.sh [DB]   (reuse pre-trained parents)
#
# 1. downstream-parents: pubmed-small at sparsity 0 / 0.5 / 0.75 (same shape, data, steps, seed; about an
#    hour each on two cores). Skipped when PARENTS names the runs to start from, or when the database
#    already holds a downstream-parents sweep whose runs completed (those are reused).
# 2. downstream-hoc: finetune-hoc from each parent x train.seed 1,2,3; downstream-hoc-random: the same
#    recipe with train.init = random (the sparsest parent's shape and tokenizer, fresh weights) x the seeds.
# 3. downstream-pubmedqa: finetune-pubmedqa from each parent x task.fold 0..9 (10-fold cross-validation
#    over the 500-question pool); downstream-pubmedqa-random: random init x the folds.
# 4. downstream-prompt: prompt-pubmedqa from each parent, fold 0; downstream-prompt-hoc: a HoC soft prompt
#    with a classification head (task.head = classifier) from each parent (HOC_PROMPT=0 leaves it out).
# Then bench/results/downstream_table.py prints the tables. A sweep of that name already in the database
# is not queued again (delete or rename it to redo it); a sweep with failed runs does not stop the rest.
#
# Knobs (defaults give the study of docs/results.md; tests/test_results_harness.py shrinks them):
#   LEVELS=0,0.5,0.75  SEEDS=1,2,3  FOLDS=0,…,9  PRETRAIN=pubmed-small  DATA=../shared/data
#   HOC=$DATA/hoc  PQA=$DATA/pubmedqa/pqal_trainval.json
#   PRETRAIN_SETS="key=value …" (extra --set for the parents), TASK_SETS="key=value …" (for every downstream run)
#   PARALLEL=N (runs the queue may run at once), MEDISWIFT / PYTHON (the commands to use)
#   ONLY="downstream-hoc downstream-prompt …" (queue only these downstream sweeps; the parents are always needed)
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${1:-results/runs.db}
read -r -a M <<< "${MEDISWIFT:-.venv/bin/mediswift}"
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
HOC=${HOC:-$DATA/hoc}
PQA=${PQA:-$DATA/pubmedqa/pqal_trainval.json}
LEVELS=${LEVELS:-0,0.5,0.75}
SEEDS=${SEEDS:-1,2,3}
FOLDS=${FOLDS:-0,1,2,3,4,5,6,7,8,9}
PRETRAIN=${PRETRAIN:-pubmed-small}
mkdir -p "$(dirname "$DB")"

as_sets() { for kv in $1; do printf -- '--set\n%s\n' "$kv"; done; }
mapfile -t PRE < <(as_sets "${PRETRAIN_SETS:-}")
mapfile -t TASK < <(as_sets "${TASK_SETS:-}")
PAR=()
[ -n "${PARALLEL:-}" ] && PAR=(--parallel "$PARALLEL")  # runs at once (the queue keeps it); default: as the queue is

# the database's view of a sweep name: "absent", or its entries' statuses; `parents` prints the completed
# pre-training runs of downstream-parents, sparsest last (engine.orchestrate: no SQL here either)
ask() {
    "$PY" - "$DB" "$@" <<'EOF'
import sys
from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB
db = RunDB(sys.argv[1])
q = Queue(db)
what, name = sys.argv[2], sys.argv[3]
sweeps = [s for s in q.sweeps() if s["name"] == name]
entries = [e for s in sweeps for e in q.entries(sweep_id=s["id"])]
if what == "status":
    print(" ".join(sorted({e["status"] for e in entries})) if sweeps else "absent")
else:
    runs = [db.get_run(e["run_id"]) for e in entries if e["status"] == "completed" and e["run_id"]]
    if len(runs) != len(entries) or not runs:
        sys.exit(f"{name}: not every parent completed ({', '.join(e['status'] for e in entries)}); "
                 "set PARENTS=\"ID …\" or redo the sweep")
    print(" ".join(r["id"] for r in sorted(runs, key=lambda r: r["config"]["sparsity"]["level"])))
EOF
}

# queue NAME CONFIG ARGS…: one sweep, worked to its end here; skipped when the database has it already
queue() {
    local name=$1 config=$2
    shift 2
    case " ${ONLY:-$name} " in *" $name "*) ;; *) echo "== $name: not in ONLY; left out"; return 0 ;; esac
    local have
    have=$(ask status "$name")
    if [ "$have" != absent ]; then
        echo "== $name: already in $DB (entries: $have); not queued again"
        return 0
    fi
    echo "== $name"
    "${M[@]}" sweep "$config" --db "$DB" --name "$name" "$@" "${PAR[@]}" --wait \
        || echo "== $name: not every run completed (the table lists them)"
}

# 1. the parents
if [ -z "${PARENTS:-}" ]; then
    if [ "$(ask status downstream-parents)" = absent ]; then
        echo "== downstream-parents"
        "${M[@]}" sweep "$PRETRAIN" --db "$DB" --name downstream-parents --grid "sparsity.level=$LEVELS" "${PRE[@]}" "${PAR[@]}" --wait
    fi
    PARENTS=$(ask parents downstream-parents)
fi
read -r -a P <<< "$PARENTS"
P_CSV=$(IFS=,; echo "${P[*]}")
P_RAND=${RANDOM_PARENT:-${P[-1]}}  # the random-init control takes the shape and tokenizer of the sparsest parent
echo "== parents: $P_CSV (random init from $P_RAND)"

HOC_DATA=(--set "task.train=$HOC/train.jsonl" --set "task.dev=$HOC/dev.jsonl")

# 2. HoC: each parent x seeds, and the random-init control
queue downstream-hoc finetune-hoc --grid "parent=$P_CSV" --grid "train.seed=$SEEDS" "${HOC_DATA[@]}" "${TASK[@]}"
queue downstream-hoc-random finetune-hoc --set "parent=$P_RAND" --set train.init=random --grid "train.seed=$SEEDS" \
    "${HOC_DATA[@]}" "${TASK[@]}"

# 3. PubMedQA: each parent x the ten folds, and the random-init control
queue downstream-pubmedqa finetune-pubmedqa --grid "parent=$P_CSV" --grid "task.fold=$FOLDS" --set "task.train=$PQA" \
    "${TASK[@]}"
queue downstream-pubmedqa-random finetune-pubmedqa --set "parent=$P_RAND" --set train.init=random \
    --grid "task.fold=$FOLDS" --set "task.train=$PQA" "${TASK[@]}"

# 4. soft prompts on the frozen parents: PubMedQA fold 0, and HoC with a classification head
queue downstream-prompt prompt-pubmedqa --grid "parent=$P_CSV" --set "task.train=$PQA" --set task.fold=0 "${TASK[@]}"
if [ "${HOC_PROMPT:-1}" != 0 ]; then
    queue downstream-prompt-hoc prompt-pubmedqa --grid "parent=$P_CSV" --set task.name=hoc --set task.head=classifier \
        "${HOC_DATA[@]}" "${TASK[@]}"
fi

"$PY" bench/results/downstream_table.py --db "$DB"
