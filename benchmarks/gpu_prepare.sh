#!/usr/bin/env bash
# Prepare, here, what a GPU piece of the campaign takes to the device machine, which has no data folder, no
# qm9pack and no ASE. Three folders that git ignores (added to .git/info/exclude), to name in the device call's
# `carry`:
#   .whl/      the ASE wheel (installed there with pip --no-index)
#   .devdata/  rMD17 split-01 train and test files of the molecules given (the training jobs' data)
#   .corpus/   the ET-ORO pretraining corpus, packed (oreo pretrain --pack-corpus; 10.8 MB)
# Usage: OREO_DATA_DIR=/path/to/data bash benchmarks/gpu_prepare.sh [--all-splits] [MOLECULE ...]   (e.g. ethanol)
#   --all-splits: every rMD17 split file (train and test 01-05) of the molecules, as MD needs (its h(r) reference is
#   every distinct rMD17 frame): a fine-tune grid piece with MD (aspirin's ten files are 15 MB)
# Then, on the device: bash benchmarks/gpu_piece.sh "JOB ARGS" ["JOB ARGS" ...]   (see that script)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OREO_DATA_DIR:?set OREO_DATA_DIR to the data folder (it holds rmd17/)}"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl .devdata/rmd17 .corpus
for d in /.whl/ /.devdata/ /.corpus/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
ase_version=$(python -c 'import ase; print(ase.__version__)')
[ -f ".whl/ase-${ase_version}-py3-none-any.whl" ] || python -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl "ase==${ase_version}"
splits=01
if [ "${1:-}" = "--all-splits" ]; then splits="01 02 03 04 05"; shift; fi
rm -f .devdata/rmd17/*.npz                 # only what this piece needs travels
for m in "$@"; do
    for k in $splits; do
        for part in train test; do
            f="$OREO_DATA_DIR/rmd17/rmd17_${m}_${part}_${k}.npz"
            [ -f "$f" ] || { echo "gpu_prepare: $f not found (oreo data download rmd17 --molecules $m)" >&2; exit 2; }
            cp "$f" .devdata/rmd17/
        done
    done
done
[ -f .corpus/et-oro.npz ] || OMP_NUM_THREADS=1 python -m forcefield.cli pretrain \
    --config examples/configs/pretrain_et_oro.yaml --corpus examples/configs/pretrain_corpus.yaml \
    --set model.hidden=96 --set model.num_layers=4 --pack-corpus .corpus/et-oro.npz --threads 1
travel=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .devdata .corpus | tail -1 | cut -f1)
echo "gpu_prepare: the tree travels with $((travel / 1000000)) MB, the carried folders add $((carried / 1000000)) MB" \
     "(the device takes 67 MB in all)"
