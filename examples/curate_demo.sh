#!/usr/bin/env bash
# The curation demo of docs/curate.md, run with MetaCLIP's defaults and with each lenient option.
#
#     bash examples/curate_demo.sh WORK_DIR [RESULTS_DIR]
#
# WORK_DIR receives the pool, the two query lists and every match/balance output.
# RESULTS_DIR (default benchmarks/results) receives curate_demo/ (the defaults, with a
# training run on their output) and curate_demo_lenient/ (--wordnet lemmas --match lenient
# --combine max), each with report.csv and report.png, and curate_demo/options.tsv: the
# captions matched, entries and pairs kept under each option alone and all together.
set -euo pipefail
W=${1:?work dir}
R=${2:-benchmarks/results}
PY=${PYTHON:-python}
mkdir -p "$W" "$R/curate_demo" "$R/curate_demo_lenient"
T=300

[ -f "$W/pool/raw.csv" ] || $PY examples/make_raw_pool.py --out "$W/pool"
[ -f "$W/q_synsets.tsv" ] || $PY -m clip_fast.curate queries --out "$W/q_synsets.tsv"
[ -f "$W/q_lemmas.tsv" ] || $PY -m clip_fast.curate queries --out "$W/q_lemmas.tsv" --wordnet lemmas

run() {  # name wordnet match combine
    local name=$1 wn=$2 match=$3 combine=$4
    $PY -m clip_fast.curate match --queries "$W/q_$wn.tsv" --input "$W/pool/raw.csv" \
        --out "$W/$name/matched" --match "$match" > "$W/$name.match.log"
    $PY -m clip_fast.curate balance --input "$W/$name/matched" --out "$W/$name/balanced" \
        --max-per-query $T --combine "$combine" > "$W/$name.balance.log"
    local matched entries kept
    matched=$(grep -o '[0-9]* matched' "$W/$name.match.log" | cut -d' ' -f1)
    kept=$(grep -o 'kept [0-9]* of [0-9]* pairs over [0-9]* entries' "$W/$name.balance.log")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$wn" "$match" "$combine" "$matched" \
        "$(echo "$kept" | awk '{print $2 "\t" $7}')" >> "$R/curate_demo/options.tsv"
}

printf 'run\twordnet\tmatch\tcombine\tmatched_captions\tkept_pairs\tentries\n' > "$R/curate_demo/options.tsv"
run default synsets metaclip any
run wordnet_lemmas lemmas metaclip any
run match_lenient synsets lenient any
run combine_max synsets metaclip max
run lenient lemmas lenient max

cp "$W/default/balanced/report.csv" "$W/default/balanced/report.png" "$R/curate_demo/"
cp "$W/lenient/balanced/report.csv" "$W/lenient/balanced/report.png" "$R/curate_demo_lenient/"
$PY -m clip_fast.train --train-data "$W/default/balanced/balanced.csv" --channels 1 --image-size 28 \
    --epochs 1 --batch-size 256 --logs-dir "$W/runs" --name curated > "$W/train.log" 2>&1
cp "$W/runs/curated/summary.json" "$W/runs/curated/metrics.csv" "$R/curate_demo/"
