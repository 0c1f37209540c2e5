// GQA decode attention: one block per (token, head). Token t's cache rows
// are k[(offset[t] + p) * kv_heads * head_dim ...], p < len[t]; scores live
// in dynamic shared memory (len floats), so len <= 48K / 4 - a little.
extern "C" __global__ void attention(const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* offset,
                                     const int* len, bf16_t* out, int heads, int kv_heads, int head_dim) {
  extern __shared__ float score[];
  int t = blockIdx.x, h = blockIdx.y, kh = h / (heads / kv_heads), n = len[t];
  const bf16_t* qv = q + ((size_t)t * heads + h) * head_dim;
  float scale = rsqrtf((float)head_dim);
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    const bf16_t* kr = k + ((size_t)(offset[t] + p) * kv_heads + kh) * head_dim;
    float s = 0.0f;
    for (int d = 0; d < head_dim; d++) s += bf2f(qv[d]) * bf2f(kr[d]);
    score[p] = s * scale;
  }
  __syncthreads();
  __shared__ float mx;
  if (threadIdx.x == 0) {
    float m = -M2N_INF;
    for (int p = 0; p < n; p++) m = fmaxf(m, score[p]);
    mx = m;
  }
  __syncthreads();
  float part = 0.0f;
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    score[p] = __expf(score[p] - mx);
    part += score[p];
  }
  float sum = block_sum(part);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int p = 0; p < n; p++) acc += score[p] * bf2f(v[((size_t)(offset[t] + p) * kv_heads + kh) * head_dim + d]);
    out[((size_t)t * heads + h) * head_dim + d] = f2bf(sum > 0.0f ? acc / sum : 0.0f);
  }
}
