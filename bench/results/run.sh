#!/usr/bin/env bash
# The sweeps behind docs/results.md, run from the repository root through the studio's own queue:
#   bash bench/results/run.sh [DB]      (default DB: results/runs.db; about an hour on two cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${1:-results/runs.db}
M=".venv/bin/mediswift"
# 1. equal training FLOPs: dense and sparse models of two widths, each given the steps that spend 8e12 FLOPs
$M sweep bench/results/pretrain-pubmed.toml --db "$DB" --name equal-flops \
    --grid sparsity.level=0,0.5,0.75 --grid model.d_model=128,256 --equal-flops 8e12 --wait
# 2. one width at equal steps, each pre-training followed by dense fine-tuning (PubMedQA, HoC) and a soft prompt
$M sweep bench/results/pretrain-pubmed.toml --db "$DB" --name sparsity-pipeline \
    --set model.d_model=256 --set model.n_ctx=256 --set train.max_steps=400 --grid sparsity.level=0,0.5,0.75 \
    --then bench/results/finetune-pubmedqa.toml --then bench/results/prompt-pubmedqa.toml \
    --then bench/results/finetune-hoc.toml --wait
# 3. the same width at a third of the learning rate, dense and 75 % sparse: is the order of sweep 2 the learning rate's?
$M sweep bench/results/pretrain-pubmed.toml --db "$DB" --name lr-check \
    --set model.d_model=256 --set model.n_ctx=256 --set train.max_steps=400 --set train.lr=1e-3 \
    --grid sparsity.level=0,0.75 --wait
.venv/bin/python bench/results/table.py --db "$DB" equal-flops sparsity-pipeline lr-check
