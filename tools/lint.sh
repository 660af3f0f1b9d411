#!/usr/bin/env bash
# Lint the repository: `ruff check`, `ruff format --check` (Python; settings in pyproject.toml) and
# `clang-format --dry-run -Werror` (csrc/; settings in .clang-format). Runs all three and exits 1 if any
# reports a finding. `tools/lint.sh --fix` applies what the tools can fix instead (ruff check --fix,
# ruff format, clang-format -i) and then checks again.
# Tools: pip install -e ".[lint]" (the versions pinned there; other versions format differently).
set -uo pipefail
cd "$(dirname "$0")/.."

fix=0
case "${1:-}" in
  "") ;;
  --fix) fix=1 ;;
  *) echo "usage: tools/lint.sh [--fix]" >&2; exit 2 ;;
esac
for tool in ruff clang-format; do
  if ! command -v "$tool" >/dev/null; then
    echo "lint: $tool not found; install the pinned tools with: pip install -e \".[lint]\"" >&2
    exit 2
  fi
done
echo "lint: $(ruff --version), $(clang-format --version | head -n 1)"

# The C++ and CUDA sources: tracked files in a git checkout, else whatever is under csrc/.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t cxx < <(git ls-files -- 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
else
  mapfile -t cxx < <(find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) | sort)
fi

if [ "$fix" -eq 1 ]; then
  ruff check --fix .
  ruff format .
  [ "${#cxx[@]}" -eq 0 ] || clang-format -i "${cxx[@]}"
fi

status=0
ruff check . || status=1
ruff format --check . || status=1
if [ "${#cxx[@]}" -gt 0 ]; then
  clang-format --dry-run -Werror "${cxx[@]}" || status=1
fi
if [ "$status" -eq 0 ]; then echo "lint: clean"; else echo "lint: findings above" >&2; fi
exit "$status"
