// A small single-threaded GEMM for the convolution kernels (gemm.cpp):
//
//   C (M, N) = op(A) (M, K) @ op(B) (K, N) + beta * C,    row-major, beta 0 or 1,
//   op(A)[i, k] = ta ? A[k * lda + i] : A[i * lda + k],  op(B) likewise with tb.
//
// Callers run it from their own threads (one GEMM per thread), so it never forks.
#pragma once

#include "common.h"

namespace gpudiff {

void gemm(bool ta, bool tb, index_t M, index_t N, index_t K, const float* A, index_t lda,
          const float* B, index_t ldb, float beta, float* C, index_t ldc);
void gemm(bool ta, bool tb, index_t M, index_t N, index_t K, const double* A, index_t lda,
          const double* B, index_t ldb, double beta, double* C, index_t ldc);

// The same with either operand given by row pointers (nullptr: the plain A / B with its ld).
// "Row" is the operand's stored row: op(A)[i, :] for ta false, op(A)[:, k] for ta true
// (likewise B); each is contiguous. The pointers cover every row the product reads.
void gemm_rows(bool ta, bool tb, index_t M, index_t N, index_t K, const float* A, index_t lda,
               const float* const* Arows, const float* B, index_t ldb, const float* const* Brows,
               float beta, float* C, index_t ldc);
void gemm_rows(bool ta, bool tb, index_t M, index_t N, index_t K, const double* A, index_t lda,
               const double* const* Arows, const double* B, index_t ldb,
               const double* const* Brows, double beta, double* C, index_t ldc);

}  // namespace gpudiff
