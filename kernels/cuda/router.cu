// Top-k of a softmax over f32 logits [tokens, experts], one thread per token.
// Ties go to the lower expert; the k weights are renormalised to sum to 1.
extern "C" __global__ void router_topk(const float* logits, int tokens, int experts, int k, int* out_experts,
                                       float* out_weights) {
  int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float* l = logits + (size_t)t * experts;
  float mx = -M2N_INF;
  for (int e = 0; e < experts; e++) mx = fmaxf(mx, l[e]);
  float sum = 0.0f;
  int last = -1;
  float last_p = M2N_INF;
  for (int j = 0; j < k; j++) {
    // The best expert after (last_p, last) in (descending p, ascending index) order.
    int best = -1;
    float bp = -1.0f;
    for (int e = 0; e < experts; e++) {
      float p = __expf(l[e] - mx);
      bool after = p < last_p || (p == last_p && e > last);
      if (after && p > bp) { bp = p; best = e; }
    }
    out_experts[t * k + j] = best;
    out_weights[t * k + j] = bp;
    sum += bp;
    last = best;
    last_p = bp;
  }
  for (int j = 0; j < k; j++) out_weights[t * k + j] /= sum;
}
