#!/usr/bin/env bash
# Makes benchmarks/figures/inpaint-quickstart.png, the example in the README's inpainting section:
# a built-in 128-px triangle with its right half masked, filled by RePaint with the quickstart model.
#   bash benchmarks/inpaint_figure.sh [RUN]      (RUN defaults to runs/quickstart-shapes)
set -euo pipefail
run=${1:-runs/quickstart-shapes}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python - "$work" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
from difftool.training.data import make_shapes
from difftool.images import to_pil

work = Path(sys.argv[1])
shapes = make_shapes(8, 128)
to_pil(shapes.images[2]).save(work / "triangle.png")  # image 2 of the built-in set is a triangle
mask = Image.new("L", (128, 128), 0)
ImageDraw.Draw(mask).rectangle([64, 0, 128, 128], fill=255)
mask.save(work / "mask.png")
PY
difftool inpaint "$work/triangle.png" "$work/mask.png" --model "$run" --class triangle --guidance-scale 3 \
  --output "$work/filled.png" --comparison --overwrite
mkdir -p benchmarks/figures
cp "$work/filled-comparison.png" benchmarks/figures/inpaint-quickstart.png
echo "wrote benchmarks/figures/inpaint-quickstart.png"
