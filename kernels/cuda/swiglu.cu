// The SwiGLU activation between the expert's GEMMs (which cuBLAS runs):
// a = silu(g) * u, stored as bf16 for the down projection.
extern "C" __global__ void swiglu_act(const float* g, const float* u, bf16_t* a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    float x = g[i];
    a[i] = f2bf(x / (1.0f + __expf(-x)) * u[i]);
  }
}
