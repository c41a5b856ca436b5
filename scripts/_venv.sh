# Sourced by scripts/test, scripts/demo and scripts/bench: make sure .venv exists
# and holds this checkout installed (editable) with the extras in $VENV_EXTRAS.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$top/.venv"
extras="${VENV_EXTRAS:-}"   # set by the caller: VENV_EXTRAS=test source scripts/_venv.sh
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.spoolops-installed${extras:+-$extras}"
# reinstall only when the package metadata changed since the last install
if [ ! -f "$stamp" ] || [ "$top/setup.cfg" -nt "$stamp" ] || [ "$top/pyproject.toml" -nt "$stamp" ]; then
  echo "installing spoolops${extras:+[$extras]} into $venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install -q -e "$top${extras:+[$extras]}"
  touch "$stamp"
fi
