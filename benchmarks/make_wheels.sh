#!/usr/bin/env bash
# Fill ./.whl (in the current repo root) with the Python packages a GPU machine without internet lacks (deepspeed,
# datasets, liger-kernel), built for its Python (PYTHON_VERSION, default 3.12) on x86-64. Run from the repo root on a
# machine with internet, then copy the repo with .whl/ (see benchmarks/README.md, "On a GPU machine without internet").
set -euo pipefail
dest=.whl
mkdir -p "$dest"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux1_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp "${plat[@]}" -d "$dest" "$@" 2> >(grep -v "is ignored" >&2); }
# deepspeed ships only as an sdist: build a pure-python wheel (no compiled ops; they JIT-build on the GPU machine).
[ -n "$(ls "$dest"/deepspeed-*.whl 2>/dev/null)" ] || python3 -m pip wheel -q --no-deps -w "$dest" "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
# deepspeed's needs that the image lacks
dl hjson pydantic pydantic-core annotated-types typing-inspection
# datasets with its needs that the image lacks. wandb is left out: its dependency chain (opentelemetry, ...) is long;
# on the GPU machine run with W&B disabled (the project must import wandb lazily and work without it).
dl datasets dill multiprocess
# peers for side-by-side benchmarks
dl liger-kernel
ls "$dest"
du -sh "$dest"
