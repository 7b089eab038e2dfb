#!/usr/bin/env bash
# pushgate on its pure-Python hot path (PUSHGATE_PURE_PYTHON), for the same
# harness as pushgate-hook.sh: `make bench-vpn` runs both, so the compiled hot
# path's gain is a ratio from one run.
PUSHGATE_PURE_PYTHON=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/pushgate-hook.sh" "$@"
