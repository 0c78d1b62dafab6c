#!/usr/bin/env bash
# Install learn2learn 0.2.0 (for scripts/bench.py compare, memory and budget) into the active environment.
# Its published C sources include longintrepr.h, which Python 3.11 removed, so
# the sources are regenerated with Cython 3 from the sdist before building.
set -euo pipefail
work="$(mktemp -d)"
pip install "cython>=3" requests gym scipy
pip download --no-deps --no-build-isolation --no-binary :all: learn2learn==0.2.0 -d "$work"
tar -xzf "$work"/learn2learn-0.2.0.tar.gz -C "$work"
cd "$work/learn2learn-0.2.0"
python -m cython -3 learn2learn/data/task_dataset.pyx learn2learn/data/meta_dataset.pyx learn2learn/data/transforms.pyx
pip install --no-deps --no-build-isolation .
cd / && python -c "import learn2learn; print('learn2learn', learn2learn.__version__, 'installed')"
