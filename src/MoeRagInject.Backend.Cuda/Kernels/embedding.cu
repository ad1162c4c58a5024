// hidden[r] = table[tokens[r]] in fp32. Grid: rows; block: 256.
extern "C" __global__ void embed(const bf16* __restrict__ table, const int* __restrict__ tokens, float* __restrict__ hidden,
    int hiddenSize, int vocab)
{
    kernel_prologue();
    const int r = blockIdx.x;
    int token = tokens[r];
    if (token < 0 || token >= vocab) token = 0;  // padding rows carry token 0; real ids are checked on the host
    const bf16* row = table + (long long)token * hiddenSize;
    float* out = hidden + (long long)r * hiddenSize;
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x) out[c] = bf16_to_float(row[c]);
}
