// The portable kernel dialect, CUDA side (NVRTC through mx.fast.cuda_kernel).
//
// Kernel bodies (*.kern) and shared helpers (*.inc) are written once against the names
// defined here and in prelude_metal.h:
//   KFN                 qualifier of helper functions
//   THREAD, SMEM_PTR    address spaces of helper parameters: registers, shared memory
//   SMEM                declares a shared (threadgroup) array inside a kernel body
//   BARRIER()           threadgroup barrier with shared-memory ordering
//   UNROLL              asks for a fully unrolled loop (register arrays stay in registers)
//   WARP_SIZE           32 on both (an Apple simdgroup is 32 wide)
//   warp_sum/warp_max/shfl_xor   warp (simdgroup) reductions and butterfly shuffles
//   k_exp2 k_exp k_log2 k_rint k_rsqrt k_tanh k_erf k_sincos bits_to_float   float math
//   KVec<T, N>, kload<T, N>(ptr, i), kstore<T, N>(ptr, i, v)   wide loads and stores
//   MmaA/MmaB/MmaAcc, mma_load_a/b/bt, mma, acc_row/acc_col, acc_row_sum/max   matrix unit
//                       (mma_cuda.inc / mma_metal.inc, for kernels declared with mma=True)
// and the entry snippet the launcher puts in front of each body names the indices:
//   tid (thread in group, x), lane, warp, group_x/y/z (group in grid).
// Scalars: the template type T is __half, __nv_bfloat16 or float; `float(v)` and `T(f)`
// convert on both backends.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int uint;

#define KFN __device__ inline
#define THREAD
#define SMEM_PTR
#define SMEM __shared__
#define BARRIER() __syncthreads()
#define UNROLL _Pragma("unroll")
#define WARP_SIZE 32

KFN float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

KFN float warp_sum(float v) {
UNROLL
  for (int mask = 16; mask > 0; mask >>= 1) v += shfl_xor(v, mask);
  return v;
}

KFN float warp_max(float v) {
UNROLL
  for (int mask = 16; mask > 0; mask >>= 1) v = fmaxf(v, shfl_xor(v, mask));
  return v;
}

KFN float k_exp2(float x) { return exp2f(x); }
KFN float k_exp(float x) { return expf(x); }
KFN float k_log2(float x) { return log2f(x); }
KFN float k_rint(float x) { return rintf(x); }  // round half to even
KFN float k_rsqrt(float x) { return rsqrtf(x); }
KFN float k_tanh(float x) { return tanhf(x); }
KFN float k_erf(float x) { return erff(x); }
KFN void k_sincos(float x, THREAD float& s, THREAD float& c) { sincosf(x, &s, &c); }
KFN float bits_to_float(int bits) { return __int_as_float(bits); }

// N consecutive elements; one 4/8/16-byte transaction when the address allows it.
template <typename T, int N>
struct alignas(sizeof(T) * N) KVec {
  T v[N];
};

template <typename T, int N, typename P>
KFN KVec<T, N> kload(P ptr, size_t i) {
  const T* p = ptr + i;
  if (reinterpret_cast<size_t>(p) % sizeof(KVec<T, N>) == 0) {
    return *reinterpret_cast<const KVec<T, N>*>(p);
  }
  KVec<T, N> r;
UNROLL
  for (int j = 0; j < N; ++j) r.v[j] = p[j];
  return r;
}

template <typename T, int N, typename P>
KFN void kstore(P ptr, size_t i, KVec<T, N> value) {
  T* p = ptr + i;
  if (reinterpret_cast<size_t>(p) % sizeof(KVec<T, N>) == 0) {
    *reinterpret_cast<KVec<T, N>*>(p) = value;
    return;
  }
UNROLL
  for (int j = 0; j < N; ++j) p[j] = value.v[j];
}
