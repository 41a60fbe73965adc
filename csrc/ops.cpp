// Op schemas for the fastprune library, all of them in this one file. Implementations
// register with TORCH_LIBRARY_IMPL, one file per op family:
//   csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu  per-device kernels (exact mirrors);
//   csrc/composite/<family>.cpp  device-generic kernels built from ATen ops
//                                (fisher_inverse, grad_blocks), one definition for every device;
//   csrc/buffer_cache.cpp  the CPU kernels' host buffer cache and its empty_cache op;
//   csrc/cpu_isa.cpp  the run-time choice of the sparse_mm and conv_grad_bias_sq CPU vector extension.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastprune._C from Python only has to run the static registrations
// below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastprune, m) {
  // Exact k-th smallest value (1-based k) over all elements of a list of
  // tensors, without concatenating them. Returns (value, number of elements
  // strictly smaller than value); ties at value are broken by the caller in
  // (tensor index, flat index) order.
  m.def("kth_smallest(Tensor[] tensors, int k) -> (Tensor, Tensor)");

  // Per-sample gradient statistics of a grouped linear map (see grad_stats.h):
  // x (N, G, T, K) inputs, dy (N, G, T, O) output gradients, per-sample gradient
  // G_n = sum_t dy[n,:,t]^T x[n,:,t] of shape (G, O, K).
  // Sums over samples of G_n and of G_n^2 (elementwise), each (G, O, K).
  m.def("grad_sq(Tensor x, Tensor dy) -> (Tensor, Tensor)");
  // The same plus the sums for the layer's bias, whose per-sample gradient is
  // sum_t dy[n,:,t] (G, O), all times `scale`, in one call (Linear and Conv layers):
  // (weight sum, weight sum of squares, bias sum, bias sum of squares, bound), where
  // bound (0-dim) is the total of both sums of squares, computed from x and dy alone
  // when T = 1: finite exactly when every entry of them is.
  m.def("grad_bias_sq(Tensor x, Tensor dy, float scale=1.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad_bias_sq of a Conv2d layer from its input x (N, C, H, W) and output gradient
  // dy (N, O, H', W') (see conv_grad_stats.h): the same five results, the weight's
  // (groups, O/groups, C/groups*kh*kw), without unfolding the input. Padding is zeros.
  m.def("conv_grad_bias_sq(Tensor x, Tensor dy, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, float scale=1.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Sums over the first dim of per-sample values t (N, *shape): (sum_n t_n, sum_n t_n^2),
  // each of `shape`, in one pass (biases and the other closed-form parameters).
  m.def("sum_sq(Tensor per_sample) -> (Tensor, Tensor)");
  // All G_n as an (N, G*O*K) tensor (the low-rank WoodFisher path).
  m.def("per_sample_grads(Tensor x, Tensor dy) -> Tensor");
  // blocks[b] += sum_n G_n[b] G_n[b]^T over blocks of B consecutive weights of the
  // flattened G_n; blocks is (ceil(G*O*K / B), B, B), the last block zero-padded.
  m.def("grad_blocks_accumulate(Tensor x, Tensor dy, Tensor(a!) blocks) -> ()");

  // Inverse damped empirical Fisher, F_b = damp I + (1/N) sum_n g_n[b] g_n[b]^T per
  // block b (see cpu/fisher_inverse.cpp). Dense: blocks (nb, B, B) hold the mean
  // outer products; returns every F_b^-1 (batched Cholesky).
  m.def("fisher_inverse(Tensor blocks, float damp) -> Tensor");
  // Low-rank: grads (nb, N, B) -> W (nb, N, B) with F_b^-1 = (I - W^T W) / damp.
  m.def("lowrank_factor(Tensor grads, float damp) -> Tensor");

  // Masked optimizer steps (see masked_optim.h), in place, one pass per tensor:
  // torch.optim's single-tensor SGD / Adam(W) update for the kept elements (mask
  // true, or every element without a mask), param and state set to 0 elsewhere.
  // first_step: the momentum buffer is initialised from the gradient, as torch does.
  m.def("masked_sgd_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor? mask, float lr, "
        "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step) -> ()");
  // step: the step count after this update (1 on the first); decoupled: AdamW.
  m.def("masked_adam_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor? mask, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step, bool decoupled, "
        "bool maximize) -> ()");

  // Sparse weight W (O, K), row-compressed (see sparse_mm.h), times dense x (B, K, M):
  // W x[b] + bias for every b, as (B, O, M); a 2-D x (N, K) gives x W^T + bias (N, O).
  m.def("sparse_mm(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor x, Tensor? bias) -> Tensor");
  // Gradient of the stored values of W for the output gradient dy (B, O, M), or (N, O) with x (N, K).
  m.def("sparse_mm_values_grad(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor x, Tensor dy) -> Tensor");

  // SparseGPT's column sweep over a row-major weight (rows, cols) with the upper Cholesky
  // factor of the damped inverse layer Hessian (see layer_obs.h): prunes each column block
  // (unstructured when prune_m is 0, else prune_n of every prune_m columns per row), moves
  // the remaining weights by the OBS updates. Returns (weight, keep mask, per-row sum of
  // (w - q)^2 / [H^-1]_jj over the pruned weights). `fixed` (bool, like weight) marks
  // weights that must be pruned (an earlier step's), unstructured only.
  m.def("sparsegpt_sweep(Tensor weight, Tensor hinv_upper, int block_size, float sparsity, int prune_n, "
        "int prune_m, Tensor? fixed=None) -> (Tensor, Tensor, Tensor)");

  // Frees the host buffers the statistics ops keep for reuse (see buffer_cache.h);
  // returns the bytes released.
  m.def("empty_cache() -> int");

  // The x86 vector extension of the sparse_mm and conv_grad_bias_sq CPU kernels (see
  // cpu_isa.h): "" reads it; "auto", "avx512", "avx2" or "generic" sets it (up to what the
  // CPU supports).
  m.def("cpu_isa(str request='') -> str");
}
