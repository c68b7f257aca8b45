# Coppice code-interpreter driver: one persistent bash context.
#
# The agent (coppice-envd) starts this file with a unix stream socket on the fd named by
# $COPPICE_DRIVER_FD, which is moved to fd 3 and closed while cells run. Each request is three NUL-terminated fields on fd 3: setup code (per-call env vars),
# the cell, and teardown code; after each the driver writes {"t":"done","rc":N} and a
# newline. Cells run through eval inside a function so that SIGINT (the agent's interrupt,
# sent to the whole process group) can abort the rest of the cell with `return 130`.
# `declare`/`typeset` would make function-local variables there, so they are aliased to
# their global forms to keep state across cells. See docs/code-interpreter.md.
shopt -s expand_aliases
alias declare='declare -g' typeset='typeset -g'
__coppice_cell() {
  eval "$1"
}
trap 'return 130' INT
__coppice_fd=$COPPICE_DRIVER_FD
unset COPPICE_DRIVER_FD
if [ "$__coppice_fd" != 3 ]; then
  exec 3<&"$__coppice_fd" {__coppice_fd}<&-
fi
printf '{"t":"ready","pid":%d}\n' "$$" >&3
while IFS= read -r -d '' __coppice_setup <&3 &&
  IFS= read -r -d '' __coppice_code <&3 &&
  IFS= read -r -d '' __coppice_teardown <&3; do
  eval "$__coppice_setup"
  __coppice_cell "$__coppice_code" 3<&-
  __coppice_rc=$?
  eval "$__coppice_teardown"
  printf '{"t":"done","rc":%d}\n' "$__coppice_rc" >&3
done
