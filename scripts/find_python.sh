#!/usr/bin/env bash
# Prints the path of a Python interpreter of version X.Y (the newest X.Y.Z found), for
# `make test-matrix` and `make test PYTHON=...`:
#   scripts/find_python.sh 3.12   ->  /root/.pyenv/versions/3.12.1/bin/python3.12
# Looks for `pythonX.Y` on PATH (one that runs: a pyenv shim of a version not selected does
# not), then among pyenv's installed versions. Exits 1 with one line saying what to install.
set -euo pipefail
want="${1:?usage: find_python.sh X.Y (e.g. 3.12)}"
if ! [[ "$want" =~ ^3\.[0-9]+$ ]]; then
  echo "find_python.sh: '$want' is not a Python version X.Y (e.g. 3.11, 3.12, 3.13)" >&2
  exit 2
fi
is_version() {  # is "$1" an interpreter of version $want?
  [ -x "$1" ] && [ "$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]
}
if exe="$(command -v "python$want" 2>/dev/null)" && is_version "$exe"; then
  "$exe" -c 'import sys; print(sys.executable)'
  exit 0
fi
if command -v pyenv >/dev/null 2>&1; then
  best="$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -V | tail -n 1 || true)"
  if [ -n "$best" ]; then
    exe="$(pyenv prefix "$best")/bin/python$want"
    if is_version "$exe"; then echo "$exe"; exit 0; fi
  fi
fi
echo "find_python.sh: no Python $want found (neither python$want on PATH nor a pyenv $want.x);" \
     "install one (e.g. 'pyenv install $want') or pass PYTHON=/path/to/python$want" >&2
exit 1
