// RMSNorm as transformers' MixtralRMSNorm: the mean square in fp32, y = w ⊙ x / sqrt(mean(x²) + eps), rounded to bf16 once.
// One row per block, held in registers (ROW_HELD, common.cuh): 1,024 threads where there are fewer rows than
// multiprocessors or under --deterministic (whose sums must not depend on the batch), 256 above (more blocks in flight);
// the host picks. Every load of a row is issued before its first sum. Rows are multiples of 8 elements.

// y = w ⊙ x · inv for the row held by the block, rounded to bf16 and stored; held keeps the rounded values (what the
// router reads).
__device__ __forceinline__ void norm_store_held(f32x4 (&held)[ROW_HELD], float inv, const bf16* __restrict__ weight,
    bf16* __restrict__ y, int hidden)
{
    const u32x2* w = (const u32x2*)weight;
#pragma unroll
    for (int j = 0; j < ROW_HELD; j++)
    {
        const int c = threadIdx.x + j * blockDim.x;
        if (c >= hidden / 4) continue;
        const f32x4 g = bf16x4_to_float(w[c]);
        const f32x4 x = held[j];
        const u32x2 out = float_to_bf16x4(f32x4{g.x * (x.x * inv), g.y * (x.y * inv), g.z * (x.z * inv), g.w * (x.w * inv)});
        ((u32x2*)y)[c] = out;
        held[j] = bf16x4_to_float(out);
    }
}

// Σ x² over the row held by the block: each thread its chunks in order, then block_sum.
__device__ __forceinline__ float held_square_sum(const f32x4 (&held)[ROW_HELD], float* scratch)
{
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < ROW_HELD; j++)
    {
        sum = fmaf(held[j].x, held[j].x, sum);
        sum = fmaf(held[j].y, held[j].y, sum);
        sum = fmaf(held[j].z, held[j].z, sum);
        sum = fmaf(held[j].w, held[j].w, sum);
    }
    return block_sum(sum, scratch);
}

// Grid: rows; block: up to 1024.
extern "C" __global__ void __launch_bounds__(1024) rms_norm(const float* __restrict__ x, const bf16* __restrict__ weight,
    bf16* __restrict__ out, int hiddenSize, float eps)
{
    kernel_prologue();
    __shared__ float scratch[32];
    const f32x4* row = (const f32x4*)(x + (long long)blockIdx.x * hiddenSize);
    f32x4 held[ROW_HELD];
#pragma unroll
    for (int j = 0; j < ROW_HELD; j++)
    {
        const int c = threadIdx.x + j * blockDim.x;
        held[j] = c < hiddenSize / 4 ? row[c] : f32x4{0.f, 0.f, 0.f, 0.f};
    }
    const float inv = 1.f / sqrtf(held_square_sum(held, scratch) / hiddenSize + eps);
    norm_store_held(held, inv, weight, out + (long long)blockIdx.x * hiddenSize, hiddenSize);
}

// residual += delta + scale · v (v may be null when scale is 0), then out = rmsnorm(residual), for one row held by the
// block; held ends with the normed row as stored.
__device__ __forceinline__ void add_rms_norm_row(float* __restrict__ row, const float* __restrict__ d, float scale,
    const float* __restrict__ v, const bf16* __restrict__ weight, bf16* __restrict__ y, int hiddenSize, float eps,
    f32x4 (&held)[ROW_HELD])
{
    __shared__ float scratch[32];
    f32x4* r4 = (f32x4*)row;
    const f32x4* d4 = (const f32x4*)d;
    const f32x4* v4 = (const f32x4*)v;
    f32x4 deltas[ROW_HELD];
#pragma unroll
    for (int j = 0; j < ROW_HELD; j++)
    {
        const int c = threadIdx.x + j * blockDim.x;
        const bool in = c < hiddenSize / 4;
        held[j] = in ? r4[c] : f32x4{0.f, 0.f, 0.f, 0.f};
        deltas[j] = in ? d4[c] : f32x4{0.f, 0.f, 0.f, 0.f};
    }
    if (scale != 0.f)
    {
        // fma(scale, v, delta) first, as add_injection adds it to the MoE output: the same bits as the two kernels.
#pragma unroll
        for (int j = 0; j < ROW_HELD; j++)
        {
            const int c = threadIdx.x + j * blockDim.x;
            if (c >= hiddenSize / 4) continue;
            const f32x4 a = v4[c];
            deltas[j] = f32x4{fmaf(scale, a.x, deltas[j].x), fmaf(scale, a.y, deltas[j].y), fmaf(scale, a.z, deltas[j].z),
                fmaf(scale, a.w, deltas[j].w)};
        }
    }
#pragma unroll
    for (int j = 0; j < ROW_HELD; j++)
    {
        const int c = threadIdx.x + j * blockDim.x;
        held[j] = f32x4{held[j].x + deltas[j].x, held[j].y + deltas[j].y, held[j].z + deltas[j].z, held[j].w + deltas[j].w};
        if (c < hiddenSize / 4) r4[c] = held[j];
    }
    const float inv = 1.f / sqrtf(held_square_sum(held, scratch) / hiddenSize + eps);
    norm_store_held(held, inv, weight, y, hiddenSize);
}

// residual += delta, then out = rmsnorm(residual). Grid: rows; block: up to 1024.
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm(float* __restrict__ residual, const float* __restrict__ delta,
    const bf16* __restrict__ weight, bf16* __restrict__ out, int hiddenSize, float eps)
{
    kernel_prologue();
    const long long r = blockIdx.x;
    f32x4 held[ROW_HELD];
    add_rms_norm_row(residual + r * hiddenSize, delta + r * hiddenSize, 0.f, nullptr, weight, out + r * hiddenSize, hiddenSize, eps, held);
}

// The end of layer `layer`: add_injection on delta (the row's slot's vector times its scale for the layer, where the row's
// position is in [start, end) of the slot's injection), then add_rms_norm, in one pass. Grid: rows; block: up to 1024.
extern "C" __global__ void __launch_bounds__(1024) add_injection_rms_norm(float* __restrict__ residual, const float* __restrict__ delta,
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
    f32x4 held[ROW_HELD];
    add_rms_norm_row(residual + r * hiddenSize, delta + r * hiddenSize, scale, vectors + (long long)max(slot, 0) * hiddenSize, weight,
        out + r * hiddenSize, hiddenSize, eps, held);
}

// The middle of a layer: add_rms_norm (the attention output into the residual stream, then the post-attention norm), then
// the router on the normed row as held (route's router_logits and route_row). Grid: rows; block: up to 1024.
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_route(float* __restrict__ residual, const float* __restrict__ delta,
    const bf16* __restrict__ weight, bf16* __restrict__ out, int hiddenSize, float eps, const bf16* __restrict__ router, int experts,
    int topK, const int* __restrict__ rowSequence, const int* __restrict__ seqSlot, int* __restrict__ topIds,
    float* __restrict__ topWeights, float* __restrict__ entropies, int layer, int layers)
{
    kernel_prologue();
    __shared__ float partial[32 * ROUTER_MAX_EXPERTS], logits[ROUTER_MAX_EXPERTS];
    const long long r = blockIdx.x;
    f32x4 held[ROW_HELD];
    add_rms_norm_row(residual + r * hiddenSize, delta + r * hiddenSize, 0.f, nullptr, weight, out + r * hiddenSize, hiddenSize, eps, held);
    router_logits(held, router, hiddenSize, experts, partial, logits);
    if (threadIdx.x == 0)
        route_row(logits, (int)r, experts, topK, seqSlot[rowSequence[r]] < 0, topIds, topWeights, entropies, layer, layers);
}
