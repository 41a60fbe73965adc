// Sparse weight times dense activations, shared by the CPU and CUDA ops.
//
// The weight W (O, K) is stored row-compressed: row_ptr (O + 1) int32, col_idx
// (nnz) int16 (read as unsigned, so K <= 65536) or int32, values (nnz) in the
// weight dtype. Activations come as x (B, K, M): B independent right-hand sides
// of M columns each (Linear: B = 1 and M = the batch, from x^T; Conv2d: B = the
// batch and M = output positions of the unfolded input). The output is
// (B, O, M). A 2-D x (N, K) is Linear's layout: the result is x W^T (N, O),
// computed through the (1, K, N) form (no copies at N = 1).
#pragma once
#include <ATen/ATen.h>

namespace fastprune {

inline void check_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                      const char* op) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kInt, op,
              ": row_ptr must be a 1-D int32 tensor of O + 1 offsets");
  TORCH_CHECK(col_idx.dim() == 1 && (col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt), op,
              ": col_idx must be a 1-D int16 or int32 tensor");
  TORCH_CHECK(values.dim() == 1 && values.size(0) == col_idx.size(0), op, ": values (", values.sizes(),
              ") and col_idx (", col_idx.sizes(), ") must be 1-D of the same length");
  TORCH_CHECK(row_ptr.is_contiguous() && col_idx.is_contiguous() && values.is_contiguous(), op,
              ": row_ptr, col_idx and values must be contiguous");
  TORCH_CHECK(row_ptr.device() == values.device() && col_idx.device() == values.device(), op,
              ": row_ptr, col_idx and values must be on one device");
  // Reading the last offset is free on CPU (on CUDA it would synchronise the stream).
  if (row_ptr.device().is_cpu()) {
    const int32_t last = row_ptr.const_data_ptr<int32_t>()[row_ptr.size(0) - 1];
    TORCH_CHECK(last == values.size(0), op, ": row_ptr ends at ", last, " but there are ", values.size(0),
                " stored values; build the pattern with fastprune.sparse.CSRWeight.from_mask");
  }
}

inline void check_activations(const at::Tensor& x, const at::Tensor& values, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, K, M) or (N, K), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), op, ": x is ", x.scalar_type(), " but the weight values are ",
              values.scalar_type());
  TORCH_CHECK(x.device() == values.device(), op, ": x is on ", x.device(), " but the weight is on ", values.device());
}

// The bias (O,), contiguous, or an undefined tensor without one.
inline at::Tensor checked_bias(const std::optional<at::Tensor>& bias, int64_t O, const at::Tensor& values) {
  if (!bias) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O && bias->scalar_type() == values.scalar_type(),
              "sparse_mm: bias must be (", O, ",) of the weight dtype, got ", bias->sizes());
  return bias->contiguous();
}

inline void check_output_grad(const at::Tensor& dy, int64_t B, int64_t O, int64_t M, const at::Tensor& values) {
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == B && dy.size(1) == O && dy.size(2) == M &&
                  dy.scalar_type() == values.scalar_type(),
              "sparse_mm_values_grad: dy must be (", B, ", ", O, ", ", M, ") of the weight dtype, got ", dy.sizes());
}

// The ops on either layout, given a backend's (B, K, M) implementations and a
// transpose of 2-D tensors into contiguous memory: Linear's (N, K) goes through
// (1, K, N) and back (views only at N = 1).
template <typename Impl, typename Transpose>
at::Tensor sparse_mm_any_layout(Impl impl, Transpose transpose, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                const at::Tensor& values, const at::Tensor& x,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "sparse_mm: x must be (B, K, M) or (N, K), got ", x.sizes());
  if (x.dim() == 3) return impl(row_ptr, col_idx, values, x, bias);
  return transpose(impl(row_ptr, col_idx, values, transpose(x).unsqueeze(0), bias).squeeze(0));
}

template <typename Impl, typename Transpose>
at::Tensor values_grad_any_layout(Impl impl, Transpose transpose, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, const at::Tensor& values, const at::Tensor& x,
                                  const at::Tensor& dy) {
  TORCH_CHECK(x.dim() == dy.dim() && (x.dim() == 2 || x.dim() == 3), "sparse_mm_values_grad: x and dy must both "
              "be (B, ., M) or both (N, .), got ", x.sizes(), " and ", dy.sizes());
  if (x.dim() == 3) return impl(row_ptr, col_idx, values, x, dy);
  return impl(row_ptr, col_idx, values, transpose(x).unsqueeze(0), transpose(dy).unsqueeze(0));
}

}  // namespace fastprune
