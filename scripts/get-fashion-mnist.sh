#!/usr/bin/env bash
# Put the full Fashion-MNIST (60k train + 10k test, 28x28) where torchvision's FashionMNIST(root,
# download=False) reads it: DEST/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed.
#
# Source: Debian's package dataset-fashion-mnist, which installs the four *-idx*-ubyte.gz files under
# /usr/share/datasets/fashion-mnist/. The package is installed with apt-get only when those files are
# missing (that needs root and a working apt). Idempotent: files already unpacked are left alone.
#
# Usage: scripts/get-fashion-mnist.sh [DEST]     (DEST defaults to ./data; SRC overrides the .gz folder)
set -euo pipefail

DEST="${1:-data}"
SRC="${SRC:-/usr/share/datasets/fashion-mnist}"
PACKAGE=dataset-fashion-mnist
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
RAW="$DEST/FashionMNIST/raw"

have_all() {
    local f
    for f in "${FILES[@]}"; do [[ -s "$1/$f$2" ]] || return 1; done
}

if have_all "$RAW" ""; then
    echo "Fashion-MNIST already unpacked in $RAW"
    exit 0
fi

if ! have_all "$SRC" ".gz"; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: $SRC lacks the Fashion-MNIST .gz files and apt-get is not available;" \
             "install Debian's $PACKAGE some other way, or copy ${FILES[*]/%/.gz} into $SRC (or set SRC=folder)" >&2
        exit 1
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        SUDO=""
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
        if [[ -z "$SUDO" ]]; then
            echo "error: $SRC lacks the Fashion-MNIST .gz files and installing $PACKAGE needs root;" \
                 "run: sudo apt-get update && sudo apt-get install -y $PACKAGE   then run this script again" >&2
            exit 1
        fi
    else
        SUDO=""
    fi
    echo "installing Debian's $PACKAGE (about 30 MB) ..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$PACKAGE" >/dev/null
    if ! have_all "$SRC" ".gz"; then
        echo "error: $PACKAGE is installed but $SRC does not hold ${FILES[*]/%/.gz}; check 'dpkg -L $PACKAGE'" >&2
        exit 1
    fi
fi

mkdir -p "$RAW"
for f in "${FILES[@]}"; do
    if [[ -s "$RAW/$f" ]]; then continue; fi
    gunzip -c "$SRC/$f.gz" > "$RAW/$f.tmp"
    mv "$RAW/$f.tmp" "$RAW/$f"
done
echo "Fashion-MNIST unpacked in $RAW"
