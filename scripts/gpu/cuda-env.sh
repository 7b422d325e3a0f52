# cuda-env.sh: sourced by the GPU-machine scripts. Finds CUDA's root: /usr/local/cuda
# where it exists (CMakeLists.txt looks there), else a versioned folder, handed to
# CMake explicitly. Sets cuda_args (extra cmake arguments) and puts nvcc on PATH.
cuda_args=()
if [ ! -x /usr/local/cuda/bin/nvcc ]; then
  for root in ${CUDA_HOME:-} /usr/local/cuda-13.0 /usr/local/cuda-13; do
    if [ -x "$root/bin/nvcc" ]; then
      export CUDA_HOME=$root
      lib=$root/targets/x86_64-linux/lib
      cuda_args=(-DCUDA_INC="$root/targets/x86_64-linux/include" -DCUBLAS_LIB="$lib/libcublas.so"
                 -DCUDART_LIB="$lib/libcudart.so")
      break
    fi
  done
fi
export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
