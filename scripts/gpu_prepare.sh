#!/usr/bin/env bash
# Gathers, on a development machine, what scripts/gpu_check.sh needs on a lent GPU machine that has
# no network: wheels of the packages imagerec imports for training that the device image lacks
# (its Python is 3.12 and holds torch, torchvision, timm, ...: see the device tool's KINDS.md), and
# the datasets. All of it goes to .gpu/ (git-ignored, ~35 MB), which the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
  -d .gpu/wheels sqlalchemy alembic mako 2>&1 | grep -v "^WARNING: Location" || true
rm -rf .gpu/datasets
cp -r ../shared/datasets .gpu/datasets
chmod -R u+w .gpu/datasets
du -sh .gpu
