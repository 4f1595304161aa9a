#!/usr/bin/env bash
# Fetch (once) the llama-cpp-python sdist and print the path of its vendor/llama.cpp folder.
# The tests run llama.cpp's own converter (convert_hf_to_gguf.py, with its own gguf-py) from there as
# the reference lowbit's GGUF writer is checked against; it is never imported by lowbit itself.
set -euo pipefail
version=${LLAMACPP_VERSION:-0.3.36}
py=${1:?usage: llamacpp_source.sh PYTHON}
root=${LOWBIT_SRC_CACHE:-$HOME/.cache/lowbit/src}
dir=$root/llama-cpp-python-$version
if [ ! -f "$dir/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  mkdir -p "$root"
  tmp=$(mktemp -d "$root/.tmp.XXXXXX")
  "$py" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$version" >&2
  tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
  rm -rf "$dir"; mv "$tmp/llama_cpp_python-$version" "$dir"; rm -rf "$tmp"
fi
echo "$dir/vendor/llama.cpp"
