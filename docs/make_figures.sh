#!/usr/bin/env bash
# Regenerate the README pictures with the shipped model on georeferenced aerial imagery of the same domain
# (../shared/data/rasterio/cogeo.tif, ../shared/data/swissimage). Usage: bash docs/make_figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=../shared/data
OUT=docs/img
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
SEG=.venv/bin/segpipe
for scene in "$SHARED/rasterio/cogeo.tif" "$SHARED/swissimage/lausanne-1091-322_00.tif"; do
  name=$(basename "$scene" .tif)
  "$SEG" run "$scene" "$TMP/$name-mask.tif" --json > "$TMP/$name.json"
  "$SEG" quicklook "$TMP/$name-mask.tif" --scene "$scene" --max-size 512 --out "$OUT/quicklook-$name.png"
done
"$SEG" explain "$SHARED/swissimage/lausanne-1091-322_00.tif" --size 256 --out "$OUT/explain-lausanne.png"
echo "pictures in $OUT"
