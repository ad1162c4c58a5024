// RMSNorm as transformers' MixtralRMSNorm: the mean square in fp32, y = w ⊙ x / sqrt(mean(x²) + eps), rounded to bf16 once.
// Grid: rows; block: up to 1024.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const bf16* __restrict__ weight, bf16* __restrict__ out,
    int hiddenSize, float eps)
{
    __shared__ float scratch[32];
    const float* row = x + (long long)blockIdx.x * hiddenSize;
    float sum = 0.f;
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x) sum = fmaf(row[c], row[c], sum);
    const float inv = 1.f / sqrtf(block_sum(sum, scratch) / hiddenSize + eps);
    bf16* y = out + (long long)blockIdx.x * hiddenSize;
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x) y[c] = float_to_bf16(bf16_to_float(weight[c]) * (row[c] * inv));
}

// residual += delta, then out = rmsnorm(residual). Grid: rows; block: 256.
extern "C" __global__ void add_rms_norm(float* __restrict__ residual, const float* __restrict__ delta, const bf16* __restrict__ weight,
    bf16* __restrict__ out, int hiddenSize, float eps)
{
    __shared__ float scratch[32];
    float* row = residual + (long long)blockIdx.x * hiddenSize;
    const float* d = delta + (long long)blockIdx.x * hiddenSize;
    float sum = 0.f;
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x)
    {
        const float v = row[c] + d[c];
        row[c] = v;
        sum = fmaf(v, v, sum);
    }
    const float inv = 1.f / sqrtf(block_sum(sum, scratch) / hiddenSize + eps);
    bf16* y = out + (long long)blockIdx.x * hiddenSize;
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x) y[c] = float_to_bf16(bf16_to_float(weight[c]) * (row[c] * inv));
}
