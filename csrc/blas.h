// The BLAS GEMM the CPU kernels (attention.cpp, lm_head.cpp) call on their own buffers: the Fortran sgemm_ /
// dgemm_ that libtorch_cpu exports (MKL in torch's x86 wheels), or at::addmm_ on views of the same buffers where
// this torch has none. Inside at::parallel_for's OpenMP region MKL runs each call on the calling thread, as it
// does for ATen's own kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

// Fortran BLAS as exported by libtorch_cpu; null where this torch has none. The integer arguments are passed
// as pointers to int64 values below 2^31: on a little-endian machine an LP64 BLAS (32-bit integers, torch's
// MKL and OpenBLAS) reads their low half, which is the value, and an ILP64 one reads all of it.
extern "C" {
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                  const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                                  const float* beta, float* c, const int* ldc);
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                  const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                                  const double* beta, double* c, const int* ldc);
}

namespace ltm {

// Row-major C (m x n, leading dimension ldc) = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n; A is
// stored row-major as m x k, or as k x m when trans_a (likewise B). beta == 0 ignores C's contents.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  constexpr bool kFloat = std::is_same_v<T, float>;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  const bool have_blas = kFloat ? sgemm_ != nullptr : dgemm_ != nullptr;
#else
  const bool have_blas = false;
#endif
  if (have_blas && k > 0) {
    // Row-major C is column-major C^T = op(B)^T op(A)^T: the same call with the operands swapped.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const auto i = [](const int64_t& v) { return reinterpret_cast<const int*>(&v); };
    if constexpr (kFloat) {
      sgemm_(&ta, &tb, i(n), i(m), i(k), &alpha, b, i(ldb), a, i(lda), &beta, c, i(ldc));
    } else {
      dgemm_(&ta, &tb, i(n), i(m), i(k), &alpha, b, i(ldb), a, i(lda), &beta, c, i(ldc));
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    at::Tensor t = trans ? at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, options).t()
                         : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options);
    return t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  out.addmm_(view(a, trans_a, m, k, lda), view(b, trans_b, k, n, ldb), beta, alpha);
}

}  // namespace ltm
