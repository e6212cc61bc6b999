// The portable kernel dialect, Metal side (mx.fast.metal_kernel). prelude_cuda.h lists the names
// both preludes define; bodies use nothing else that differs between the two languages.
// MLX compiles this after its own utilities (metal_stdlib, bfloat16_t); the template type T is
// float16_t, bfloat16_t or float.

#include <metal_stdlib>
#include <metal_simdgroup_matrix>

using namespace metal;

#define KFN inline
#define THREAD thread
#define SMEM_PTR threadgroup
#define SMEM threadgroup
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define UNROLL _Pragma("clang loop unroll(full)")
#define WARP_SIZE 32

KFN float shfl_xor(float v, int mask) { return simd_shuffle_xor(v, ushort(mask)); }
KFN float warp_sum(float v) { return simd_sum(v); }
KFN float warp_max(float v) { return simd_max(v); }

KFN float k_exp2(float x) { return metal::exp2(x); }
KFN float k_exp(float x) { return metal::exp(x); }
KFN float k_log2(float x) { return metal::precise::log2(x); }
KFN float k_rint(float x) { return metal::rint(x); }  // round half to even
KFN float k_rsqrt(float x) { return metal::precise::rsqrt(x); }
KFN float k_tanh(float x) { return metal::precise::tanh(x); }
KFN void k_sincos(float x, THREAD float& s, THREAD float& c) { s = metal::precise::sincos(x, c); }
KFN float bits_to_float(int bits) { return as_type<float>(bits); }

// The Metal standard library has no erf: Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
KFN float k_erf(float x) {
  const float t = 1.0f / (1.0f + 0.3275911f * metal::fabs(x));
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float y = 1.0f - poly * metal::exp(-x * x);
  return x < 0.0f ? -y : y;
}

// Inputs of fewer than 8 elements arrive in the constant address space, so helpers take the
// pointer type as a template parameter; the compiler merges the element accesses.
template <typename T, int N>
struct KVec {
  T v[N];
};

template <typename T, int N, typename P>
KFN KVec<T, N> kload(P ptr, size_t i) {
  KVec<T, N> r;
  UNROLL for (int j = 0; j < N; ++j) r.v[j] = ptr[i + j];
  return r;
}

template <typename T, int N, typename P>
KFN void kstore(P ptr, size_t i, KVec<T, N> value) {
  UNROLL for (int j = 0; j < N; ++j) ptr[i + j] = value.v[j];
}
