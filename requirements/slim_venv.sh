#!/bin/sh
# Shrink the image's virtual environment (run in the build stage, after every install):
# - files no server start needs: torch's C++ headers, its test binaries and test suite (the
#   shared-memory manager stays), pyarrow's headers and tests;
# - symbol tables of shared libraries (`strip --strip-unneeded`: the dynamic symbols that
#   loading and linking use stay; libtorch_cpu.so alone drops from 414 to 329 MB);
# - pip, setuptools and wheel (the runtime installs nothing).
# requirements/compile_imports.py, run after this, loads the model and runs a forward and a
# backward pass, so a library this broke fails the build.
set -eu
venv=${1:-/opt/venv}
site=$(echo "$venv"/lib/python3*/site-packages)
rm -rf "$site/torch/include" "$site/torch/test" "$site/pyarrow/include" "$site/pyarrow/tests"
find "$site/torch/bin" -type f ! -name torch_shm_manager -delete
# Not in the <package>.libs folders: auditwheel vendors those with patchelf, and strip breaks
# patchelf's layout ("ELF load command address/offset not page-aligned", seen on numpy's BLAS).
find "$site" -type f -name '*.so*' ! -path '*.libs/*' -exec strip --strip-unneeded {} +
"$venv/bin/python" -m pip uninstall --yes --quiet pip setuptools wheel
