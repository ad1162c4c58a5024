// Causal grouped-query attention of each row over its sequence's paged bf16 KV cache (written for this step's rows by
// rope_kv_write before). One block per (row, KV head) handles that head's group of query heads, so each key and value is
// read once for the group. Each warp takes every ATT_WARPS-th key with a running (online) softmax; lanes split the head
// dimensions; the warps' partial results are merged at the end in a fixed order. Every row is computed the same way
// whatever else is in the batch. Instantiated for bounds on the group (query heads per KV head) and on the head dimensions
// per lane (headDim / 32); the host picks the smallest that fit. Grid: (rows, kvHeads); block: ATT_WARPS × 32; dynamic
// shared memory: ATT_WARPS × group × headDim floats.
#define ATT_WARPS 16

template <int ATT_MAX_GROUP, int ATT_MAX_DPL>
__device__ __forceinline__ void attention_impl(
    const float* __restrict__ qkv, const bf16* __restrict__ kCache, const bf16* __restrict__ vCache, bf16* __restrict__ out,
    const int* __restrict__ positions, const int* __restrict__ rowSequence, const int* __restrict__ seqSlot,
    const int* __restrict__ blockTables, int maxBlocks, int blockSize,
    int heads, int kvHeads, int headDim, int window, float scale, int qkvWidth)
{
    __shared__ float partialM[ATT_WARPS][ATT_MAX_GROUP];
    __shared__ float partialL[ATT_WARPS][ATT_MAX_GROUP];
    extern __shared__ float partialAcc[];  // [ATT_WARPS][group][headDim]

    const int r = blockIdx.x, kvHead = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = heads / kvHeads;
    const int dpl = (headDim + 31) / 32;
    const int qWidth = heads * headDim, kvWidth = kvHeads * headDim;
    bf16* o = out + (long long)r * qWidth + kvHead * group * headDim;
    const int slot = seqSlot[rowSequence[r]];
    if (slot < 0)
    {
        for (int c = threadIdx.x; c < group * headDim; c += blockDim.x) o[c] = 0;
        return;
    }

    const float* qRow = qkv + (long long)r * qkvWidth + kvHead * group * headDim;
    float q[ATT_MAX_GROUP][ATT_MAX_DPL];
    float acc[ATT_MAX_GROUP][ATT_MAX_DPL];
    float m[ATT_MAX_GROUP], l[ATT_MAX_GROUP];
#pragma unroll
    for (int g = 0; g < ATT_MAX_GROUP; g++)
    {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < ATT_MAX_DPL; i++)
        {
            const int d = lane + 32 * i;
            q[g][i] = (g < group && i < dpl && d < headDim) ? qRow[g * headDim + d] * scale : 0.f;
            acc[g][i] = 0.f;
        }
    }

    const int position = positions[r];
    const int lo = window > 0 ? max(0, position - window + 1) : 0;
    const int* table = blockTables + (long long)slot * maxBlocks;
    for (int j = lo + warp; j <= position; j += ATT_WARPS)
    {
        const long long cacheRow = ((long long)table[j / blockSize] * blockSize + j % blockSize) * kvWidth + kvHead * headDim;
        float k[ATT_MAX_DPL], v[ATT_MAX_DPL];
#pragma unroll
        for (int i = 0; i < ATT_MAX_DPL; i++)
        {
            const int d = lane + 32 * i;
            const bool in = i < dpl && d < headDim;
            k[i] = in ? bf16_to_float(kCache[cacheRow + d]) : 0.f;
            v[i] = in ? bf16_to_float(vCache[cacheRow + d]) : 0.f;
        }
#pragma unroll
        for (int g = 0; g < ATT_MAX_GROUP; g++)
        {
            if (g >= group) break;
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < ATT_MAX_DPL; i++) s = fmaf(q[g][i], k[i], s);
            s = warp_sum(s);
            const float mNew = fmaxf(m[g], s);
            const float correction = expf(m[g] - mNew);
            const float p = expf(s - mNew);
            l[g] = l[g] * correction + p;
#pragma unroll
            for (int i = 0; i < ATT_MAX_DPL; i++) acc[g][i] = fmaf(acc[g][i], correction, p * v[i]);
            m[g] = mNew;
        }
    }

    // Merge the warps: each warp's (m, l, acc) to shared memory, then every output dimension from all warps in order.
    for (int g = 0; g < group; g++)
    {
        if (lane == 0)
        {
            partialM[warp][g] = m[g];
            partialL[warp][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < ATT_MAX_DPL; i++)
        {
            const int d = lane + 32 * i;
            if (i < dpl && d < headDim) partialAcc[(warp * group + g) * headDim + d] = acc[g][i];
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < group * headDim; c += blockDim.x)
    {
        const int g = c / headDim, d = c % headDim;
        float mAll = NEG_INF;
        for (int w = 0; w < ATT_WARPS; w++) mAll = fmaxf(mAll, partialM[w][g]);
        float lAll = 0.f, value = 0.f;
        for (int w = 0; w < ATT_WARPS; w++)
        {
            const float mw = partialM[w][g];
            if (mw == NEG_INF) continue;  // a warp that saw no key
            const float f = expf(mw - mAll);
            lAll = fmaf(partialL[w][g], f, lAll);
            value = fmaf(partialAcc[(w * group + g) * headDim + d], f, value);
        }
        o[c] = float_to_bf16(value / lAll);
    }
}

#define ATTENTION_KERNEL(G, D) \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_g##G##_d##D( \
        const float* __restrict__ qkv, const bf16* __restrict__ kCache, const bf16* __restrict__ vCache, bf16* __restrict__ out, \
        const int* __restrict__ positions, const int* __restrict__ rowSequence, const int* __restrict__ seqSlot, \
        const int* __restrict__ blockTables, int maxBlocks, int blockSize, \
        int heads, int kvHeads, int headDim, int window, float scale, int qkvWidth) \
    { \
        attention_impl<G, D>(qkv, kCache, vCache, out, positions, rowSequence, seqSlot, blockTables, maxBlocks, blockSize, \
            heads, kvHeads, headDim, window, scale, qkvWidth); \
    }

ATTENTION_KERNEL(1, 1) ATTENTION_KERNEL(1, 2) ATTENTION_KERNEL(1, 4) ATTENTION_KERNEL(1, 8)
ATTENTION_KERNEL(2, 1) ATTENTION_KERNEL(2, 2) ATTENTION_KERNEL(2, 4) ATTENTION_KERNEL(2, 8)
ATTENTION_KERNEL(4, 1) ATTENTION_KERNEL(4, 2) ATTENTION_KERNEL(4, 4) ATTENTION_KERNEL(4, 8)
ATTENTION_KERNEL(8, 1) ATTENTION_KERNEL(8, 2) ATTENTION_KERNEL(8, 4) ATTENTION_KERNEL(8, 8)
