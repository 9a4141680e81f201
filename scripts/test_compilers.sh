#!/usr/bin/env bash
# Builds the C++ library with GCC 13 (Ubuntu 24.04's compiler), GCC 14 and clang 19 and runs its ctest
# suite with each (every CPU kernel copy this CPU supports must be compiled in and pass). clang builds
# it as a user's project would, through samples/cpp (add_subdirectory), whose program runs as one
# more ctest test. The compilers come from Debian trixie, installed into a throwaway root with
# debootstrap (needs root); the build inside it uses the torch of the project's virtual environment.
#
#   scripts/test_compilers.sh                 # after scripts/setup_env.sh
#   PYFASTNN_COMPILERS_CACHE=/some/dir scripts/test_compilers.sh
#
# The root (~3-4 minutes to create) is cached in $PYFASTNN_COMPILERS_CACHE (default
# /var/cache/pyfastnn-ci) and recreated when missing or broken; ccache's cache lives beside it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"  # VENV, absolute and exported
CACHE="${PYFASTNN_COMPILERS_CACHE:-/var/cache/pyfastnn-ci}"
SUITE=trixie
PACKAGES="g++-13,g++-14,clang-19,cmake,ninja-build,ccache"
COMPILERS="g++-13 g++-14 clang++-19"
JAIL="$CACHE/$SUITE-root"
STAMP="$JAIL/.pyfastnn-root"  # written last: the packages the root was made with
start=$(date +%s)
say() { echo "[compilers $(( $(date +%s) - start ))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "scripts/test_compilers.sh needs root (debootstrap, chroot)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || { echo "no virtual environment at $VENV: run scripts/setup_env.sh first" >&2; exit 1; }
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock 9  # one run at a time per cache

# The first Debian archive this machine's apt is configured with (deb822 .sources or sources.list).
apt_mirror() {
  local uri
  uri="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | grep -v -- '-security' | head -n 1 || true)"
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
           /etc/apt/sources.list | grep -v -- '-security' | head -n 1 || true)"
  fi
  [ -n "$uri" ] || { echo "no apt mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list" >&2; return 1; }
  echo "$uri"
}

# Nothing may stay mounted inside the root once we are done (or before it is deleted).
unmount_all() {
  local target
  for target in "$JAIL/pyfastnn/ccache" "$JAIL/dev" "$JAIL/sys" "$JAIL/proc"; do
    if mountpoint -q "$target"; then umount -l "$target"; fi
  done
  if grep -q " $JAIL/" /proc/mounts; then
    echo "still mounted below $JAIL; not touching it" >&2
    return 1
  fi
}
trap unmount_all EXIT

root_ok() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PACKAGES" ] &&
    chroot "$JAIL" /bin/sh -c "for tool in $COMPILERS cmake ninja ccache; do \$tool --version || exit 1; done" \
      > /dev/null 2>&1
}

if ! root_ok; then
  unmount_all
  mirror="$(apt_mirror)"
  say "creating the $SUITE root in $JAIL from $mirror (cached for later runs)"
  command -v debootstrap > /dev/null || apt-get install -y -qq debootstrap > /dev/null
  rm -rf "$JAIL" "$JAIL.new"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$JAIL.new" "$mirror" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -n 30 "$CACHE/debootstrap.log"; exit 1; }
  rm -rf "$JAIL.new/var/cache/apt/archives"/*.deb
  echo "$PACKAGES" > "$JAIL.new/.pyfastnn-root"
  mv "$JAIL.new" "$JAIL"
  root_ok || { echo "the new $SUITE root does not run its compilers" >&2; exit 1; }
  say "root ready"
else
  say "reusing the $SUITE root in $JAIL"
fi

# This checkout's files and the venv's torch (hard links where the file system allows: no copy).
rm -rf "$JAIL/pyfastnn/src"
mkdir -p "$JAIL/pyfastnn/src" "$JAIL/pyfastnn/torch"
(cd "$ROOT" && git ls-files -co --exclude-standard | tar -cf - -T -) | tar -xf - -C "$JAIL/pyfastnn/src"
TORCH_DIR="$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
TORCH_COPY="/pyfastnn/torch/$TORCH_VERSION"
if [ ! -f "$JAIL$TORCH_COPY/.complete" ]; then
  say "placing torch $TORCH_VERSION in the root"
  rm -rf "$JAIL/pyfastnn/torch"/*
  mkdir -p "$JAIL$TORCH_COPY"
  for dir in "$TORCH_DIR" "$TORCH_DIR.libs"; do
    [ -d "$dir" ] || continue
    cp -al "$dir" "$JAIL$TORCH_COPY/" 2> /dev/null || cp -a "$dir" "$JAIL$TORCH_COPY/"
  done
  touch "$JAIL$TORCH_COPY/.complete"
fi

# torch reads the CPU's features and topology from /proc and /sys; ccache's cache outlives the root.
for target in proc sys dev; do mount --bind "/$target" "$JAIL/$target"; done
mkdir -p "$CACHE/ccache" "$JAIL/pyfastnn/ccache"
mount --bind "$CACHE/ccache" "$JAIL/pyfastnn/ccache"

status=0
for compiler in $COMPILERS; do
  build="/pyfastnn/build-$compiler"
  project="/pyfastnn/src$([ "$compiler" = clang++-19 ] && echo /samples/cpp || true)"
  say "$compiler: $(chroot "$JAIL" "$compiler" --version | head -n 1)"
  if ! chroot "$JAIL" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root CCACHE_DIR=/pyfastnn/ccache \
      CCACHE_MAXSIZE=2G /bin/bash -c "set -e
        rm -rf '$build'
        cmake -S '$project' -B '$build' -G Ninja -DCMAKE_CXX_COMPILER='$compiler' -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
          -DCMAKE_PREFIX_PATH='$TORCH_COPY/torch/share/cmake' > '$build.configure.log' 2>&1 || { cat '$build.configure.log'; exit 1; }
        grep 'pyfastnn CPU kernels' '$build.configure.log'
        cmake --build '$build' -j '${MAX_JOBS:-2}' > '$build.build.log' 2>&1 || { cat '$build.build.log'; exit 1; }
        grep -i 'warning' '$build.build.log' | head -n 20 || true
        ctest --test-dir '$build' --output-on-failure"; then
    echo "[compilers] FAILED with $compiler" >&2
    status=1
  fi
  say "$compiler done"
done
exit $status
