// Dispatch layout: gathers row src_token[r] of x into row r of out (the
// index map, built by a counting sort, says which token each row holds).
extern "C" __global__ void permute_rows(const bf16_t* x, const int* src_token, bf16_t* out, int rows, int hidden) {
  int r = blockIdx.x;
  if (r >= rows) return;
  const bf16_t* src = x + (size_t)src_token[r] * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[(size_t)r * hidden + i] = src[i];
}
