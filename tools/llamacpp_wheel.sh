#!/usr/bin/env bash
# Build (once) and print the path of a llama-cpp-python wheel that runs on this host and never takes
# llama.cpp's AMX path.
#
# Why: a native build (-march=native) on a CPU with AMX segfaults inside llama_decode on every quantized
# GGUF (the AMX "extra buffer type"), and a wheel built natively on one CPU can die with SIGILL on another.
# So the build is never native: GGML_NATIVE=OFF, the SIMD levels this CPU has switched on one by one, AMX
# always off. The wheel is cached under a folder named by the hash of those flags, so a wheel built for one
# instruction set is never reused on a host that lacks it, and pip's own wheel cache (keyed only by the
# sdist) is bypassed.
set -euo pipefail
version=${LLAMACPP_VERSION:-0.3.36}
py=${1:?usage: llamacpp_wheel.sh PYTHON}

flags() {
  local have
  have=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  local args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  on() { case "$have" in *" $1 "*) args+=" -D$2=ON";; *) args+=" -D$2=OFF";; esac; }
  on avx GGML_AVX; on avx2 GGML_AVX2; on fma GGML_FMA; on f16c GGML_F16C; on bmi2 GGML_BMI2
  case "$have" in
    *" avx512f "*" avx512bw "*|*" avx512bw "*" avx512f "*)
      args+=" -DGGML_AVX512=ON"; on avx512_vnni GGML_AVX512_VNNI; on avx512vbmi GGML_AVX512_VBMI
      on avx512_bf16 GGML_AVX512_BF16;;
    *) args+=" -DGGML_AVX512=OFF";;
  esac
  echo "$args"
}

cmake_args=$(flags)
key=$(printf '%s %s' "$version" "$cmake_args" | sha256sum | cut -c1-12)
dir=${LOWBIT_WHEEL_CACHE:-$HOME/.cache/lowbit/wheels}/llama-cpp-python-$version-$key
if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version once with CMAKE_ARGS='$cmake_args' (about 10-20 min on 2 cores)" >&2
  tmp="$dir.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  CMAKE_ARGS="$cmake_args" "$py" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$tmp" "llama-cpp-python==$version" >&2
  echo "$cmake_args" > "$tmp/CMAKE_ARGS"
  rm -rf "$dir"; mv "$tmp" "$dir"
fi
ls "$dir"/llama_cpp_python-*.whl
