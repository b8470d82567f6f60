#!/usr/bin/env bash
# Build llama.cpp's `llama-server` twice, for `bot bench --serve --against llama-server`:
#   $BOT_CACHE/llama-server/native/llama-server   (-DGGML_NATIVE=ON: every ISA this CPU has)
#   $BOT_CACHE/llama-server/avx2/llama-server     (AVX2 + FMA + F16C, every AVX512 flavour off)
# The source is the llama.cpp that the llama-cpp-python sdist on PyPI vendors
# (vendor/llama.cpp), fetched by package name with pip. Only the llama-server target is
# built (about 4 minutes per build on 2 cores). Nothing else is downloaded: no curl, no
# OpenSSL (HTTPS is off; the benchmark talks plain HTTP on loopback), no Web UI assets.
#
# Idempotent: a build whose binary exists and runs is skipped. Atomic: each build happens
# in a temp dir and its folder is moved into place at the end, so an interrupted run
# leaves nothing half-built under $BOT_CACHE.
#
# Usage: bash scripts/build-llama-server.sh [native|avx2|both]     (default both)
# Env:   BOT_CACHE (default ~/.cache/bot), JOBS (default: number of cores),
#        LLAMA_CPP_PYTHON_VERSION (default 0.3.36, the version issue 23 measured)
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHICH="${1:-both}"
CACHE="${BOT_CACHE:-$HOME/.cache/bot}"
DEST="$CACHE/llama-server"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"

case "$WHICH" in
  native) BUILDS="native" ;;
  avx2) BUILDS="avx2" ;;
  both) BUILDS="native avx2" ;;
  *) echo "usage: $0 [native|avx2|both]  (got '$WHICH')" >&2; exit 2 ;;
esac

say() { echo "[build-llama-server] $*"; }
die() { echo "[build-llama-server] error: $*" >&2; exit 1; }

# Python for pip: the project's venv if it exists, else python3
PY="$HERE/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3 || true)"
[ -n "$PY" ] || die "no python3 found (needed for 'pip download'). Fix: install python3, or run 'make install' first"

# flags common to both builds: a static binary that runs from anywhere, nothing fetched
COMMON=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_BACKEND_DL=OFF
        -DGGML_CPU_ALL_VARIANTS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
        -DLLAMA_BUILD_SERVER=ON -DGGML_OPENMP=ON)
# the AVX2-only build: the x86 options of vendor/llama.cpp/ggml/CMakeLists.txt, AVX2-era on,
# every AVX512 sub-flag (F, VBMI, VNNI, BF16), AVX-VNNI and AMX off
AVX2=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
      -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF
      -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
NATIVE=(-DGGML_NATIVE=ON)

built() { [ -x "$DEST/$1/llama-server" ] && "$DEST/$1/llama-server" --version >/dev/null 2>&1; }

TODO=""
for b in $BUILDS; do
  if built "$b"; then
    say "$b: $DEST/$b/llama-server exists and runs; skipped (delete that folder to rebuild)"
  else
    TODO="$TODO $b"
  fi
done
[ -n "$TODO" ] || exit 0

# tools: a C/C++ compiler, make, cmake >= 3.14 (the system's, else pip's)
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
  || die "no C compiler. Fix: apt-get install build-essential"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
  || die "no C++ compiler. Fix: apt-get install build-essential"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
CMAKE="$(command -v cmake || true)"
if [ -z "$CMAKE" ]; then
  say "cmake not found on PATH; installing it with pip into $WORK/cmake"
  "$PY" -m pip install -q --disable-pip-version-check --target "$WORK/cmake" cmake
  CMAKE="$WORK/cmake/bin/cmake"
  export PYTHONPATH="$WORK/cmake${PYTHONPATH:+:$PYTHONPATH}"
fi
say "cmake: $("$CMAKE" --version | head -1) ($CMAKE); $JOBS jobs"

say "downloading the llama-cpp-python==$VERSION sdist from PyPI (pip, by package name)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  --dest "$WORK/sdist" "llama-cpp-python==$VERSION"
SDIST="$(ls "$WORK"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | head -1)"
[ -n "$SDIST" ] || die "pip did not leave a llama_cpp_python-*.tar.gz in $WORK/sdist"
say "extracting $(basename "$SDIST")"
tar -xzf "$SDIST" -C "$WORK"
SRC="$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
[ -f "$SRC/CMakeLists.txt" ] || die "$SDIST has no vendor/llama.cpp/CMakeLists.txt"

for b in $TODO; do
  if [ "$b" = native ]; then FLAGS=("${NATIVE[@]}"); else FLAGS=("${AVX2[@]}"); fi
  say "$b: configuring (${FLAGS[*]})"
  t0=$(date +%s)
  "$CMAKE" -S "$SRC" -B "$WORK/build-$b" "${COMMON[@]}" "${FLAGS[@]}" >"$WORK/configure-$b.log" 2>&1 \
    || { tail -40 "$WORK/configure-$b.log" >&2; die "$b: cmake configure failed (log above)"; }
  say "$b: building target llama-server with -j$JOBS (a few minutes on 2 cores)"
  "$CMAKE" --build "$WORK/build-$b" --target llama-server -j "$JOBS" >"$WORK/build-$b.log" 2>&1 \
    || { tail -40 "$WORK/build-$b.log" >&2; die "$b: build failed (log above)"; }
  BIN="$WORK/build-$b/bin/llama-server"
  [ -x "$BIN" ] || die "$b: the build finished but $BIN is missing"
  "$BIN" --version >/dev/null 2>&1 || die "$b: $BIN does not run: $("$BIN" --version 2>&1 | tail -3)"
  if command -v ldd >/dev/null 2>&1 && ldd "$BIN" | grep -Eq "libssl|libcrypto|libcurl"; then
    die "$b: $BIN links OpenSSL or curl: $(ldd "$BIN" | grep -E "libssl|libcrypto|libcurl" | tr '\n' ' ')"
  fi
  if [ "$b" = avx2 ] && command -v objdump >/dev/null 2>&1; then
    # AVX512 code uses the zmm registers; an AVX2-only binary has none
    n=$(objdump -d --no-show-raw-insn "$BIN" | grep -c "%zmm" || true)
    [ "$n" = 0 ] || die "avx2: $BIN still holds $n AVX512 (zmm) instructions; check the flags"
    say "avx2: no AVX512 (zmm) instruction in the binary"
  fi
  mkdir -p "$DEST"
  STAGE="$(mktemp -d "$DEST/.$b.XXXXXX")"
  chmod 755 "$STAGE"  # mktemp -d makes it private
  cp "$BIN" "$STAGE/llama-server"
  {
    echo "llama-cpp-python sdist: $VERSION (vendor/llama.cpp)"
    echo "llama-server --version: $("$BIN" --version 2>&1 | tr '\n' ' ')"
    echo "cmake flags: ${COMMON[*]} ${FLAGS[*]}"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(nproc) cores"
  } >"$STAGE/BUILD-INFO.txt"
  rm -rf "$DEST/$b"  # only a folder that failed the check above (no runnable binary)
  mv "$STAGE" "$DEST/$b"
  rm -rf "$WORK/build-$b"
  say "$b: done in $(( $(date +%s) - t0 )) s -> $DEST/$b/llama-server"
done
