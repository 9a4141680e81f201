# Sourced (not run) by the set-up scripts, after they set ROOT to the project folder: VENV is the
# project's virtual environment, $PYFASTNN_VENV or .venv in the project, as an absolute path (a
# relative one is the caller's folder's, wherever the scripts cd later), exported so that the
# scripts they run take the same environment.
VENV="${PYFASTNN_VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PYFASTNN_VENV="$VENV"
