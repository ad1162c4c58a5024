// RMSNorm as transformers' MixtralRMSNorm: the mean square in fp32, y = w ⊙ x / sqrt(mean(x²) + eps), rounded to bf16 once.
// Grid: rows; block: up to 1024.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const bf16* __restrict__ weight, bf16* __restrict__ out,
    int hiddenSize, float eps)
{
    kernel_prologue();
    __shared__ float scratch[32];
    const float* row = x + (long long)blockIdx.x * hiddenSize;
    float sum = 0.f;
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x) sum = fmaf(row[c], row[c], sum);
    const float inv = 1.f / sqrtf(block_sum(sum, scratch) / hiddenSize + eps);
    bf16* y = out + (long long)blockIdx.x * hiddenSize;
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x) y[c] = float_to_bf16(bf16_to_float(weight[c]) * (row[c] * inv));
}

// residual += delta + scale · v (v may be null when scale is 0), then out = rmsnorm(residual); one row per block.
__device__ __forceinline__ void add_rms_norm_row(float* __restrict__ row, const float* __restrict__ d, float scale,
    const float* __restrict__ v, const bf16* __restrict__ weight, bf16* __restrict__ y, int hiddenSize, float eps)
{
    __shared__ float scratch[32];
    float sum = 0.f;
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x)
    {
        // fma(scale, v, delta) first, as add_injection adds it to the MoE output: the same bits as the two kernels.
        const float value = row[c] + (scale != 0.f ? fmaf(scale, v[c], d[c]) : d[c]);
        row[c] = value;
        sum = fmaf(value, value, sum);
    }
    const float inv = 1.f / sqrtf(block_sum(sum, scratch) / hiddenSize + eps);
    for (int c = threadIdx.x; c < hiddenSize; c += blockDim.x) y[c] = float_to_bf16(bf16_to_float(weight[c]) * (row[c] * inv));
}

// residual += delta, then out = rmsnorm(residual). Grid: rows; block: up to 1024.
extern "C" __global__ void add_rms_norm(float* __restrict__ residual, const float* __restrict__ delta, const bf16* __restrict__ weight,
    bf16* __restrict__ out, int hiddenSize, float eps)
{
    kernel_prologue();
    const long long r = blockIdx.x;
    add_rms_norm_row(residual + r * hiddenSize, delta + r * hiddenSize, 0.f, nullptr, weight, out + r * hiddenSize, hiddenSize, eps);
}

// The end of layer `layer`: add_injection on delta (the row's slot's vector times its scale for the layer, where the row's
// position is in [start, end) of the slot's injection), then add_rms_norm, in one pass. Grid: rows; block: up to 1024.
extern "C" __global__ void add_injection_rms_norm(float* __restrict__ residual, const float* __restrict__ delta,
    const bf16* __restrict__ weight, bf16* __restrict__ out, int hiddenSize, float eps, const float* __restrict__ vectors,
    const float* __restrict__ scales, const int* __restrict__ starts, const int* __restrict__ ends, const int* __restrict__ positions,
    const int* __restrict__ rowSequence, const int* __restrict__ seqSlot, int layer, int layers)
{
    kernel_prologue();
    const long long r = blockIdx.x;
    const int slot = seqSlot[rowSequence[r]];
    float scale = 0.f;
    if (slot >= 0)
    {
        const int position = positions[r];
        if (position >= starts[slot] && position < ends[slot]) scale = scales[slot * layers + layer];
    }
    add_rms_norm_row(residual + r * hiddenSize, delta + r * hiddenSize, scale, vectors + (long long)max(slot, 0) * hiddenSize, weight,
        out + r * hiddenSize, hiddenSize, eps);
}

// The middle of a layer: add_rms_norm (the attention output into the residual stream, then the post-attention norm), then
// the router on the normed row (route's router_logits and route_row), one block per row. Grid: rows; block: 1024.
extern "C" __global__ void add_rms_norm_route(float* __restrict__ residual, const float* __restrict__ delta, const bf16* __restrict__ weight,
    bf16* __restrict__ out, int hiddenSize, float eps, const bf16* __restrict__ router, int experts, int topK,
    const int* __restrict__ rowSequence, const int* __restrict__ seqSlot, int* __restrict__ topIds, float* __restrict__ topWeights,
    float* __restrict__ entropies, int layer, int layers)
{
    kernel_prologue();
    __shared__ float partial[ROUTER_MAX_EXPERTS], logits[ROUTER_MAX_EXPERTS];
    const long long r = blockIdx.x;
    bf16* normed = out + r * hiddenSize;
    add_rms_norm_row(residual + r * hiddenSize, delta + r * hiddenSize, 0.f, nullptr, weight, normed, hiddenSize, eps);
    __syncthreads();  // the normed row each thread wrote is now visible to the whole block
    router_logits(normed, router, hiddenSize, experts, partial, logits);
    if (threadIdx.x == 0)
        route_row(logits, (int)r, experts, topK, seqSlot[rowSequence[r]] < 0, topIds, topWeights, entropies, layer, layers);
}
