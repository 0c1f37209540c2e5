// Rotary embeddings, rotate-half layout, in place on [tokens, heads, head_dim].
// Grid: (tokens, heads); threads over the first half of head_dim.
extern "C" __global__ void rope(bf16_t* x, const unsigned int* pos, int heads, int head_dim, float theta) {
  int half = head_dim / 2;
  bf16_t* v = x + ((size_t)blockIdx.x * heads + blockIdx.y) * head_dim;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float freq = powf(theta, -2.0f * i / head_dim);
    float s, c;
    sincosf(pos[blockIdx.x] * freq, &s, &c);
    float x0 = bf2f(v[i]), x1 = bf2f(v[i + half]);
    v[i] = f2bf(x0 * c - x1 * s);
    v[i + half] = f2bf(x1 * c + x0 * s);
  }
}
