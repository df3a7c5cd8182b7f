#!/bin/sh
# A native llama-server built with ggml's own thread pool instead of OpenMP
# (-DGGML_OPENMP=OFF), for bench/cpu_sharing.py --server-noomp; from the llama.cpp source lalo's
# engine build already fetched (run `lalo engine build` first). About 6 min on 2 cores, once;
# prints the binary's path.
set -eu
cache="${LALO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lalo}"
tree=$(ls -d "$cache"/sources/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | tail -n 1)
[ -n "$tree" ] || { echo "no llama.cpp source under $cache/sources: run lalo engine build" >&2; exit 1; }
out="$cache/bench/llama.cpp-noomp-native"
if [ ! -x "$out/bin/llama-server" ]; then
  cmake -S "$tree" -B "$out" -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF >&2
  cmake --build "$out" -j "$(nproc)" --target llama-server >&2
fi
echo "$out/bin/llama-server"
