#!/usr/bin/env bash
# Prepares what bench/gpu_rehearsal.sh needs on the device machine (no network, no ../shared there):
#   .rehearsal/shared/data/{corpus-mix,smollm2-tokenizer,eval}   copied from the shared data folder
#   .rehearsal/wheels/*.whl                                       the data and eval stages' packages the
#                                                                 device image lacks (x86-64, Python 3.12)
# Run here, once:  bench/rehearsal_carry.sh [SHARED_DIR]   (default ../shared)
# Then on the device (carry .whl and .rehearsal):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .rehearsal/wheels/*.whl
#   PYTHONPATH=/tmp/site bench/gpu_rehearsal.sh --python python3 --shared .rehearsal/shared --out /tmp/reh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="$(cd "${1:-$REPO/../shared}" && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
DEST="$REPO/.rehearsal"
# What the data stage (ftfy) and the eval stage (lm-eval and its needs) import beyond the device image
# (its package list: /work/.library/device/KINDS.md), pinned to the versions the project's venv holds.
PACKAGES=(ftfy==6.3.1 wcwidth==0.9.4 lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1
          multiprocess==0.70.19 more-itertools==11.2.1 pytablewriter==1.2.1 DataProperty==1.1.1
          mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5
          chardet==6.0.0.post1 rouge_score==0.1.2 nltk==3.10.4 sqlitedict==2.1.0 word2number==1.1)
grep -qx '/.rehearsal/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.rehearsal/' >> "$REPO/.git/info/exclude"
mkdir -p "$DEST/shared/data" "$DEST/wheels"
for part in corpus-mix smollm2-tokenizer eval; do
  rm -rf "$DEST/shared/data/$part"
  cp -r "$SHARED/data/$part" "$DEST/shared/data/$part"
done
for pkg in "${PACKAGES[@]}"; do
  name="${pkg%%==*}"
  if ls "$DEST/wheels" | grep -qi "^${name//-/_}-\|^${name}-"; then continue; fi
  # A binary wheel for the device where one exists, else a wheel built here from the source (all of
  # these that lack wheels are pure Python).
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DEST/wheels" "$pkg" 2>/dev/null \
    || "$PY" -m pip wheel -q --no-deps -w "$DEST/wheels" "$pkg"
done
du -sh "$DEST"
ls "$DEST/wheels"
