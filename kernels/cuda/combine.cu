// Combine: acc[token[r]] += weight[r] * rows[r], then one rounding to bf16.
extern "C" __global__ void combine_rows(const bf16_t* rows, const int* token, const float* weight, float* acc,
                                        int n_rows, int hidden) {
  int r = blockIdx.x;
  if (r >= n_rows) return;
  float w = weight[r];
  float* dst = acc + (size_t)token[r] * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) atomicAdd(dst + i, w * bf2f(rows[(size_t)r * hidden + i]));
}

extern "C" __global__ void f32_to_bf16(const float* x, bf16_t* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = f2bf(x[i]);
}
