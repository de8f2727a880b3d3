#!/usr/bin/env bash
# (Copied from the project's shared tools, shared/tools/setup-cuda13-wheels.sh, so a clone has it.)
# Build a CUDA-13.0 "toolkit root" from NVIDIA's PyPI wheels, good enough to build
# candle 0.11.1 with --features cuda on a machine with no GPU and no CUDA toolkit.
# Usage: setup-cuda13-wheels.sh PREFIX     (creates PREFIX/venv, PREFIX/cuda, PREFIX/env.sh)
set -euo pipefail
PREFIX=$(realpath -m "${1:?usage: $0 PREFIX}")
mkdir -p "$PREFIX"
python3 -m venv "$PREFIX/venv"
# Pin everything to CUDA 13.0 (Update 1) versions; --no-deps because nvidia-cuda-nvcc's deps are unpinned
"$PREFIX/venv/bin/pip" install -q --no-deps \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.88 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
W=$("$PREFIX/venv/bin/python" -c 'import os,nvidia; print(os.path.join(list(nvidia.__path__)[0],"cu13"))')
C="$PREFIX/cuda"
rm -rf "$C"; mkdir -p "$C/lib64/stubs"
ln -s "$W/bin" "$C/bin"; ln -s "$W/include" "$C/include"; ln -s "$W/nvvm" "$C/nvvm"
for f in "$W"/lib/*.so.*; do ln -s "$f" "$C/lib64/$(basename "$f")"; done
# the wheels ship only versioned sonames; the linker needs the dev names
for p in libcublas.so:libcublas.so.13 libcublasLt.so:libcublasLt.so.13 libcudart.so:libcudart.so.13 \
         libcurand.so:libcurand.so.10 libnvrtc.so:libnvrtc.so.13; do
  ln -s "${p#*:}" "$C/lib64/${p%:*}"
done
# cudarc's source must be in the registry (a fresh machine has only what a CPU build fetched).
(cd "$(dirname "$0")/.." && cargo fetch -q)
# No wheel ships libcuda (it belongs to the driver). Build a link-time stub with soname libcuda.so.1
# exporting every driver-API function cudarc 0.19 can reference; every function returns
# CUDA_ERROR_STUB_LIBRARY (34), so if it is ever loaded by mistake cuInit fails cleanly.
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
grep -oP '^\s+fn \Kcu\w+(?=\()' "$CUDARC/src/driver/sys/mod.rs" | sort -u |
  awk 'BEGIN{print "/* link-time stub of libcuda.so.1 */"} {print "int " $1 "(void) { return 34; }"}' > "$C/lib64/stubs/libcuda_stub.c"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$C/lib64/stubs/libcuda.so" "$C/lib64/stubs/libcuda_stub.c"
ln -s libcuda.so "$C/lib64/stubs/libcuda.so.1"
cat > "$PREFIX/env.sh" <<ENV
# source me before: cargo build --release   (candle-core/candle-nn with features=["cuda"])
export CUDA_ROOT=$C
export CUDA_HOME=$C            # cudarc link-search root (also CUDA_ROOT/CUDA_PATH/CUDA_TOOLKIT_ROOT_DIR); cudaforge fallback
export PATH=$C/bin:\$PATH      # cudarc runs 'nvcc --version' from PATH; cudaforge uses which(nvcc)
export NVCC=$C/bin/nvcc        # cudaforge (candle-kernels' build helper) checks NVCC first
export CUDA_COMPUTE_CAP=90     # no nvidia-smi here; H100 = sm_90 (cudaforge makes it sm_90a)
export CUDARC_CUDA_VERSION=13000  # pin cudarc's bindings to CUDA 13.0 (matches nvcc --version anyway)
ENV
echo "ok: source $PREFIX/env.sh"
