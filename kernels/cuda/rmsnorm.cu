// RMSNorm: one block per token.
extern "C" __global__ void rmsnorm(const bf16_t* x, const bf16_t* w, bf16_t* y, int hidden, float eps) {
  const bf16_t* xr = x + (size_t)blockIdx.x * hidden;
  bf16_t* yr = y + (size_t)blockIdx.x * hidden;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = bf2f(xr[i]);
    ss += v * v;
  }
  float r = rsqrtf(block_sum(ss) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) yr[i] = f2bf(bf2f(xr[i]) * r * bf2f(w[i]));
}
