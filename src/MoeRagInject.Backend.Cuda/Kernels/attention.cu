// Causal grouped-query attention over each sequence's paged bf16 KV cache (written for this step's rows by rope_kv_write
// before). Four kinds of kernel:
//  - attention_g*_d* (every row of shapes the tensor-core kernels do not take): one block per (row, KV head, split) handles
//    that head's group of query heads, so each key and value is read once for the group. Each warp takes every
//    ATT_WARPS-th key of the block's share with a running (online) softmax; lanes split the head dimensions; the warps'
//    partial results are merged at the end in a fixed order. With one split (grid z = 1) the block writes the output; with
//    more, the row's keys are cut into that many contiguous shares (so a short batch still fills the GPU) and each block
//    writes its unnormalised sums with their maximum and total into `partial`, which attention_combine merges in split
//    order. A row's result depends only on its own keys and the split count, which the host derives from the step's rows.
//  - attention_tc_d* (steps with prompt rows, default mode): flash-style, on the tensor cores; see below.
//  - attention_wg_d128_g* (the same for sequences of 32 rows or more in the step, on Hopper, head_dim 128): on wgmma.
//  - attention_decode_d* (decode steps, and every row under --deterministic, in a fixed number of splits): one warp
//    per (row, KV head, split) on the tensor cores, the keys as the mma rows; see below. attention_decode_tc_d*, the
//    group's query heads as the mma rows, is kept to measure against.
// Instantiated for bounds on the group (query heads per KV head) and on the head dimensions per lane (headDim / 32); the
// host picks the smallest that fit. Grid: (rows, kvHeads, splits); block: ATT_WARPS × 32; dynamic shared memory:
// ATT_WARPS × group × headDim floats.
#define ATT_WARPS 16

template <int ATT_MAX_GROUP, int ATT_MAX_DPL>
__device__ __forceinline__ void attention_impl(
    const float* __restrict__ qkv, const bf16* __restrict__ kCache, const bf16* __restrict__ vCache, bf16* __restrict__ out,
    const int* __restrict__ positions, const int* __restrict__ rowSequence, const int* __restrict__ seqSlot,
    const int* __restrict__ blockTables, int maxBlocks, int blockSize,
    int heads, int kvHeads, int headDim, int window, float scale, int qkvWidth, float* __restrict__ partial)
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
    // This block's split record: the group's unnormalised sums, then their maxima, then their totals.
    float* record = partial + (((long long)r * gridDim.y + kvHead) * gridDim.z + blockIdx.z) * (group * (headDim + 2));
    const int slot = seqSlot[rowSequence[r]];
    if (slot < 0)
    {
        if (gridDim.z == 1)
            for (int c = threadIdx.x; c < group * headDim; c += blockDim.x) o[c] = 0;
        else
            for (int c = threadIdx.x; c < group * (headDim + 2); c += blockDim.x) record[c] = c < group * (headDim + 1) ? (c < group * headDim ? 0.f : NEG_INF) : 0.f;
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
    const int share = (position - lo + 1 + gridDim.z - 1) / gridDim.z;
    const int begin = lo + (int)blockIdx.z * share, end = min(position + 1, begin + share);
    for (int j = begin + warp; j < end; j += ATT_WARPS)
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
        if (gridDim.z == 1)
            o[c] = float_to_bf16(value / lAll);
        else
        {
            record[c] = value;
            if (d == 0)
            {
                record[group * headDim + g] = mAll;
                record[group * (headDim + 1) + g] = lAll;
            }
        }
    }
}

// Merges a row's split records (the decode kernels with grid z > 1) in split order into its output: a thread a (query
// head, split) loads the split's maximum and total, one thread a query head turns them into scale factors (shared
// memory), then a thread an output issues its loads from every split before it adds them, in split order. The kernel
// is latency-bound at small batches: at batch 1, a thread a query head loading the splits in turn and each output's
// loads waiting on its test of the factor took 7.9 µs a layer under ncu (session 33). Grid: (rows, kvHeads); block:
// group · headDim threads (the host rounds it to warps, 128 at least, 1,024 at most). At most 8 query heads per KV head
// and 16 splits (the host's bounds).
#define ATT_COMBINE_MAX_SPLITS 16
extern "C" __global__ void attention_combine(const float* __restrict__ partial, bf16* __restrict__ out, int heads, int kvHeads,
    int headDim, int splits)
{
    kernel_prologue();
    __shared__ float factor[8 * ATT_COMBINE_MAX_SPLITS], maxima[8 * ATT_COMBINE_MAX_SPLITS], totals[8 * ATT_COMBINE_MAX_SPLITS];
    __shared__ float denominator[8];
    const int r = blockIdx.x, kvHead = blockIdx.y, group = heads / kvHeads, width = group * (headDim + 2);
    const float* records = partial + ((long long)r * kvHeads + kvHead) * splits * width;
    bf16* o = out + (long long)r * heads * headDim + kvHead * group * headDim;
    if (threadIdx.x < group * splits)
    {
        const int g = threadIdx.x / splits, z = threadIdx.x % splits;
        maxima[threadIdx.x] = records[z * width + group * headDim + g];
        totals[threadIdx.x] = records[z * width + group * (headDim + 1) + g];
    }
    __syncthreads();
    if (threadIdx.x < group)
    {
        const int g = threadIdx.x;
        float mAll = NEG_INF;
        for (int z = 0; z < splits; z++) mAll = fmaxf(mAll, maxima[g * splits + z]);
        float lAll = 0.f;
        for (int z = 0; z < splits; z++)
        {
            const float m = maxima[g * splits + z];
            const float f = m == NEG_INF ? 0.f : expf(m - mAll);  // 0: a split with no keys
            factor[g * splits + z] = f;
            if (m != NEG_INF) lAll = fmaf(totals[g * splits + z], f, lAll);
        }
        denominator[g] = mAll == NEG_INF ? 0.f : lAll;  // 0: a padding row
    }
    __syncthreads();
    for (int c = threadIdx.x; c < group * headDim; c += blockDim.x)
    {
        const int g = c / headDim;
        float v[ATT_COMBINE_MAX_SPLITS];
#pragma unroll
        for (int z = 0; z < ATT_COMBINE_MAX_SPLITS; z++) v[z] = z < splits ? records[z * width + c] : 0.f;
        if (denominator[g] == 0.f)
        {
            o[c] = 0;
            continue;
        }
        float value = 0.f;
#pragma unroll
        for (int z = 0; z < ATT_COMBINE_MAX_SPLITS; z++)
        {
            const float f = z < splits ? factor[g * splits + z] : 0.f;
            if (f != 0.f) value = fmaf(v[z], f, value);  // a split with no keys may hold anything: skipped, as before
        }
        o[c] = float_to_bf16(value / denominator[g]);
    }
}

// attention_combine as it was before session 33 (MOE_RAG_INJECT_COMBINE=serial, to measure against): a thread a query head
// loads the splits' maxima and totals in turn, and each output's loads follow its test of the split's factor.
// Merges a row's split records (the decode kernels with grid z > 1) in split order into its output. One thread per query
// head first turns the splits' maxima into scale factors (shared memory), so that each output's loop over the splits has
// only independent loads. Grid: (rows, kvHeads); block: 128. At most 8 query heads per KV head and 16 splits (the host's
// bounds).
extern "C" __global__ void attention_combine_serial(const float* __restrict__ partial, bf16* __restrict__ out, int heads, int kvHeads,
    int headDim, int splits)
{
    kernel_prologue();
    __shared__ float factor[8 * 16], denominator[8];
    const int r = blockIdx.x, kvHead = blockIdx.y, group = heads / kvHeads, width = group * (headDim + 2);
    const float* records = partial + ((long long)r * kvHeads + kvHead) * splits * width;
    bf16* o = out + (long long)r * heads * headDim + kvHead * group * headDim;
    if (threadIdx.x < group)
    {
        const int g = threadIdx.x;
        float mAll = NEG_INF;
        for (int z = 0; z < splits; z++) mAll = fmaxf(mAll, records[z * width + group * headDim + g]);
        float lAll = 0.f;
        for (int z = 0; z < splits; z++)
        {
            const float m = records[z * width + group * headDim + g];
            const float f = m == NEG_INF ? 0.f : expf(m - mAll);  // 0: a split with no keys
            factor[g * splits + z] = f;
            if (m != NEG_INF) lAll = fmaf(records[z * width + group * (headDim + 1) + g], f, lAll);
        }
        denominator[g] = mAll == NEG_INF ? 0.f : lAll;  // 0: a padding row
    }
    __syncthreads();
    for (int c = threadIdx.x; c < group * headDim; c += blockDim.x)
    {
        const int g = c / headDim;
        if (denominator[g] == 0.f)
        {
            o[c] = 0;
            continue;
        }
        float value = 0.f;
#pragma unroll 4
        for (int z = 0; z < splits; z++)
        {
            const float f = factor[g * splits + z];
            if (f != 0.f) value = fmaf(records[z * width + c], f, value);
        }
        o[c] = float_to_bf16(value / denominator[g]);
    }
}

#define ATTENTION_KERNEL(G, D) \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_g##G##_d##D( \
        const float* __restrict__ qkv, const bf16* __restrict__ kCache, const bf16* __restrict__ vCache, bf16* __restrict__ out, \
        const int* __restrict__ positions, const int* __restrict__ rowSequence, const int* __restrict__ seqSlot, \
        const int* __restrict__ blockTables, int maxBlocks, int blockSize, \
        int heads, int kvHeads, int headDim, int window, float scale, int qkvWidth, float* __restrict__ partial) \
    { kernel_prologue(); \
        attention_impl<G, D>(qkv, kCache, vCache, out, positions, rowSequence, seqSlot, blockTables, maxBlocks, blockSize, \
            heads, kvHeads, headDim, window, scale, qkvWidth, partial); \
    }

ATTENTION_KERNEL(1, 1) ATTENTION_KERNEL(1, 2) ATTENTION_KERNEL(1, 4) ATTENTION_KERNEL(1, 8)
ATTENTION_KERNEL(2, 1) ATTENTION_KERNEL(2, 2) ATTENTION_KERNEL(2, 4) ATTENTION_KERNEL(2, 8)
ATTENTION_KERNEL(4, 1) ATTENTION_KERNEL(4, 2) ATTENTION_KERNEL(4, 4) ATTENTION_KERNEL(4, 8)
ATTENTION_KERNEL(8, 1) ATTENTION_KERNEL(8, 2) ATTENTION_KERNEL(8, 4) ATTENTION_KERNEL(8, 8)

// Flash-style attention on the tensor cores, for steps that hold prompt rows (prefill chunks, and the decode rows beside
// them). A block takes up to P consecutive rows of one sequence and one KV head; its warps are (row tile, query head of
// the group) pairs, each 16 rows of one query head, so every key and value tile loaded into shared memory serves the
// whole group. Keys go by in tiles of 64 at absolute positions 0, 64, 128, ... (cp.async, double-buffered, 16-byte
// chunks XOR-swizzled): S = Q·Kᵀ (mma m16n8k16, bf16 in, fp32 out), masked (causal, window), a running softmax in base 2,
// then O += P·V. q (fp32, scaled by scale · log2 e) and p each enter as two bf16 parts, x ≈ hi + lo, and each product as
// the sum of both: they then carry about 16 bits. With p rounded once to bf16 (as most flash kernels do), the reference
// checkpoints' router entropies moved by up to 0.08 nats from the fp32 reference (0.016 with this split, as with the
// fp32 kernel). The extra products cost about 2% of a prefill: on an H200, 9.7 ms of a 2,048-token prompt's ~100
// against 7.9 with q and p rounded once, which put the Mixtral-8x7B-dimension checkpoint's router entropies 0.085 nats
// from transformers-fp32 (beyond the 0.05 its check allows); with only q rounded once, its greedy choices agreed with
// transformers' at 95 of 107 positions against 98 (the check wants 90%). A row's result depends only
// on its own keys (tiles are cut at absolute positions, and a fully masked tile leaves the sums unchanged), not on which
// block or step it lands in. Rows of a sequence are consecutive and in position order within a step (the runner's
// layout). Grid: (row tiles, bound included: ⌈rows / P⌉ + sequences, kvHeads); block: (P / 16) · group warps, at most 8;
// dynamic shared memory: 4 · 64 · D bf16 (K and V, two stages). rowsBelow > 0: only sequences with fewer rows in the step
// (the others go to attention_wg_*).
#define FA_BN 64

// Element offset of 16-byte chunk c of key row r in a [64][D] tile (D / 8 chunks a row), XOR-swizzled over at most 8 chunks.
template <int D>
__device__ __forceinline__ int fa_swizzled(int r, int c)
{
    constexpr int CH = D / 8, MASK = CH < 8 ? CH - 1 : 7;
    return r * D + ((c ^ (r & MASK)) << 3);
}

// Keys tileStart .. tileStart + BN − 1 (those ≤ hi; zeros past it) of the KV head into a [BN][D] tile each of K and V.
// A thread copies the same 16-byte chunk of every (blockDim / (D / 8))-th key, so a key's cache address (its block-table
// entry; the block size a power of two) is worked out once for all its chunks of a thread.
template <int D, int BN>
__device__ __forceinline__ void fa_load_tile(bf16* sK, bf16* sV, const bf16* __restrict__ kCache, const bf16* __restrict__ vCache,
    const int* table, int blockSize, int kvWidth, int kvHead, int tileStart, int hi)
{
    constexpr int CH = D / 8;
    const int c = threadIdx.x % CH, keysPerPass = blockDim.x / CH, shift = __ffs(blockSize) - 1;
    const unsigned kBase = shared_address(sK), vBase = shared_address(sV);
    const bf16* kChunk = kCache + kvHead * D + c * 8;
    const bf16* vChunk = vCache + kvHead * D + c * 8;
    for (int key = threadIdx.x / CH; key < BN; key += keysPerPass)
    {
        const int j = tileStart + key;
        const bool valid = j <= hi;
        const long long offset = valid ? (((long long)table[j >> shift] << shift) + (j & (blockSize - 1))) * kvWidth : 0;
        const unsigned to = (unsigned)fa_swizzled<D>(key, c) * 2u;
        copy_async16(kBase + to, kChunk + offset, valid);
        copy_async16(vBase + to, vChunk + offset, valid);
    }
}

// q of the thread's two rows (g and g + 8 of a warp's 16; null: a padding row) as mma A fragments, scaled so that scores
// come out in base 2, each as two bf16 parts (hi, lo).
template <int D>
__device__ __forceinline__ void fa_load_q(unsigned (&qf)[D / 16][4], unsigned (&ql)[D / 16][4], const float* q0, const float* q1,
    float qScale, int t)
{
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
        for (int i = 0; i < 4; i++)
        {
            const float* q = (i & 1) ? q1 : q0;
            const int d = kk * 16 + 2 * t + 8 * (i >> 1);
            const float x = q != nullptr ? q[d] * qScale : 0.f, y = q != nullptr ? q[d + 1] * qScale : 0.f;
            qf[kk][i] = pack_bf16x2(x, y);
            ql[kk][i] = pack_bf16x2(x - lo_bf16(qf[kk][i]), y - hi_bf16(qf[kk][i]));
        }
}

// One tile of BN keys (at tileStart, staged in k and v) for a warp's 16 rows: scores, mask (key j counts for the thread's
// row i when low[i] ≤ j ≤ pos[i]), the running maximum m and sums l (this thread's columns; summed over the quad at the
// end), and O += P·V.
template <int D, int BN>
__device__ __forceinline__ void fa_tile(const unsigned (&qf)[D / 16][4], const unsigned (&ql)[D / 16][4], float (&o)[D / 8][4],
    float (&m)[2], float (&l)[2], const bf16* k, const bf16* v, int tileStart, const int (&pos)[2], const int (&low)[2], int lane,
    bool masked)
{
    const int t = lane & 3, mat = lane >> 3;
    float s[BN / 8][4];
#pragma unroll
    for (int n = 0; n < BN / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
        for (int np = 0; np < BN / 16; np++)
        {
            unsigned b[4];
            load_matrix_x4(shared_address(k + fa_swizzled<D>(np * 16 + (mat >> 1) * 8 + (lane & 7), kk * 2 + (mat & 1))), b);
            mma_16x8x16(s[2 * np], ql[kk], b[0], b[1]);
            mma_16x8x16(s[2 * np + 1], ql[kk], b[2], b[3]);
            mma_16x8x16(s[2 * np], qf[kk], b[0], b[1]);
            mma_16x8x16(s[2 * np + 1], qf[kk], b[2], b[3]);
        }
    float tileMax[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int n = 0; n < BN / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++)
        {
            const int i = e >> 1, j = tileStart + n * 8 + 2 * t + (e & 1);
            if (masked && (j > pos[i] || j < low[i])) s[n][e] = NEG_INF;
            tileMax[i] = fmaxf(tileMax[i], s[n][e]);
        }
    float correction[2];
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        tileMax[i] = fmaxf(tileMax[i], __shfl_xor_sync(0xffffffffu, tileMax[i], 1));
        tileMax[i] = fmaxf(tileMax[i], __shfl_xor_sync(0xffffffffu, tileMax[i], 2));
        const float mNew = fmaxf(m[i], tileMax[i]);
        // A row with no key yet keeps m = −inf and sums of zero (its exponentials are taken against 0).
        const float base = mNew == NEG_INF ? 0.f : mNew;
        correction[i] = exp2f(m[i] - base);
        m[i] = mNew;
        l[i] *= correction[i];
#pragma unroll
        for (int n = 0; n < BN / 8; n++)
#pragma unroll
            for (int e = 2 * i; e < 2 * i + 2; e++)
            {
                s[n][e] = exp2f(s[n][e] - base);
                l[i] += s[n][e];
            }
    }
#pragma unroll
    for (int n = 0; n < D / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[n][e] *= correction[e >> 1];
    // O += P·V: the score accumulators of n-tiles 2kk and 2kk + 1 are the A fragment of keys 16kk .. 16kk + 15.
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++)
    {
        const unsigned a[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]), pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                               pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        const unsigned r[4] = {pack_bf16x2(s[2 * kk][0] - lo_bf16(a[0]), s[2 * kk][1] - hi_bf16(a[0])),
                               pack_bf16x2(s[2 * kk][2] - lo_bf16(a[1]), s[2 * kk][3] - hi_bf16(a[1])),
                               pack_bf16x2(s[2 * kk + 1][0] - lo_bf16(a[2]), s[2 * kk + 1][1] - hi_bf16(a[2])),
                               pack_bf16x2(s[2 * kk + 1][2] - lo_bf16(a[3]), s[2 * kk + 1][3] - hi_bf16(a[3]))};
#pragma unroll
        for (int np = 0; np < D / 16; np++)
        {
            unsigned b[4];
            load_matrix_x4_trans(shared_address(v + fa_swizzled<D>(kk * 16 + (mat & 1) * 8 + (lane & 7), np * 2 + (mat >> 1))), b);
            mma_16x8x16(o[2 * np], r, b[0], b[1]);
            mma_16x8x16(o[2 * np + 1], r, b[2], b[3]);
            mma_16x8x16(o[2 * np], a, b[0], b[1]);
            mma_16x8x16(o[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// Runs the key tiles tileBegin .. tileEnd − 1 (BN keys each from `first`) through fa_tile for every warp of the block,
// loading each into shared memory once for all warps (STAGES: 2, the next tile loads during this one's products; 1, a
// quarter of the shared memory, for kernels that rely on other resident blocks instead). A warp whose rows see none of a
// tile's keys (warpLo .. warpHi) skips its products but meets the barriers.
template <int D, int BN, int STAGES>
__device__ __forceinline__ void fa_run(const unsigned (&qf)[D / 16][4], const unsigned (&ql)[D / 16][4], float (&o)[D / 8][4],
    float (&m)[2], float (&l)[2], bf16* sK, bf16* sV, const bf16* __restrict__ kCache, const bf16* __restrict__ vCache,
    const int* table, int blockSize, int kvWidth, int kvHead, int first, int tileBegin, int tileEnd, int hi,
    const int (&pos)[2], const int (&low)[2], int warpLo, int warpHi, int lane)
{
#pragma unroll
    for (int n = 0; n < D / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[n][e] = 0.f;
    m[0] = m[1] = NEG_INF;
    l[0] = l[1] = 0.f;
    if (tileBegin >= tileEnd) return;
    if (STAGES == 2)
    {
        fa_load_tile<D, BN>(sK, sV, kCache, vCache, table, blockSize, kvWidth, kvHead, first + tileBegin * BN, hi);
        copy_async_commit();
    }
    for (int kt = tileBegin; kt < tileEnd; kt++)
    {
        const int stage = STAGES == 2 ? (kt - tileBegin) & 1 : 0, tileStart = first + kt * BN;
        if (STAGES == 1)
            fa_load_tile<D, BN>(sK, sV, kCache, vCache, table, blockSize, kvWidth, kvHead, tileStart, hi);
        else if (kt + 1 < tileEnd)
            fa_load_tile<D, BN>(sK + (stage ^ 1) * BN * D, sV + (stage ^ 1) * BN * D, kCache, vCache, table, blockSize, kvWidth, kvHead,
                tileStart + BN, hi);
        copy_async_commit();
        if (STAGES == 1) copy_async_wait<0>(); else copy_async_wait<1>();
        __syncthreads();
        if (tileStart <= warpHi && tileStart + BN - 1 >= warpLo)
        {
            // The mask only where some row of the warp sees part of the tile (padding rows, pos −1, are never written).
            bool whole = true;
#pragma unroll
            for (int i = 0; i < 2; i++) whole &= pos[i] < 0 || (low[i] <= tileStart && tileStart + BN - 1 <= pos[i]);
            const bool masked = !__all_sync(0xffffffffu, whole);
            fa_tile<D, BN>(qf, ql, o, m, l, sK + stage * BN * D, sV + stage * BN * D, tileStart, pos, low, lane, masked);
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
}

// The normalised output of one of the thread's rows (i: g or g + 8) as bf16 into row[0 .. D).
template <int D>
__device__ __forceinline__ void fa_write(bf16* row, const float (&o)[D / 8][4], float l, int i, int t)
{
    const float inv = 1.f / l;
#pragma unroll
    for (int n = 0; n < D / 8; n++) *(unsigned*)(row + n * 8 + 2 * t) = pack_bf16x2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
}

// A prompt-attention block's share of the step: one KV head and up to rowsPerTile consecutive rows of one sequence,
// among the sequences with minRows ≤ rows < maxRows in the step (the others are another kernel's); seq −1: none left.
// Heaviest first: the card starts blocks in the order of blockIdx.x, then .y, so the n-th block started takes KV head
// n mod kvHeads and the n / kvHeads-th row tile from the end. Under the causal mask a row tile's keys grow with its rows,
// and started in row order the longest blocks came last and ran alone at the end (a 2,048-row prompt's 129 tiles on 8
// KV heads: about 1.3 times the evenly shared time in a simulation of the card's 264 block slots, 1.02 heaviest first;
// on an H200, 9.8 ms of such a prompt's 32 layers against 11.9). heavyFirst 0: grid order, kept to measure against.
struct PromptTile { int seq, kvHead, rowBegin, rowEnd; };

__device__ __forceinline__ PromptTile prompt_tile(const int* __restrict__ queryStart, int sequences, int rowsPerTile, int minRows,
    int maxRows, int heavyFirst)
{
    const int started = blockIdx.y * gridDim.x + blockIdx.x;
    PromptTile place = {-1, heavyFirst ? started % (int)gridDim.y : (int)blockIdx.y, 0, 0};
    int tile = heavyFirst ? gridDim.x - 1 - started / gridDim.y : blockIdx.x;
    for (int s = 0; s < sequences; s++)
    {
        const int begin = queryStart[s], end = queryStart[s + 1];
        if (end - begin < minRows || end - begin >= maxRows) continue;
        const int tiles = (end - begin + rowsPerTile - 1) / rowsPerTile;
        if (tile < tiles)
        {
            place.seq = s;
            place.rowBegin = begin + tile * rowsPerTile;
            place.rowEnd = min(end, place.rowBegin + rowsPerTile);
            break;
        }
        tile -= tiles;
    }
    return place;
}

// Zeros for a block's rows of its KV head's query heads (their sequence's slot was freed: nothing to attend to).
__device__ __forceinline__ void prompt_tile_zero(bf16* __restrict__ out, const PromptTile& place, int qWidth, int groupWidth)
{
    for (int i = threadIdx.x; i < (place.rowEnd - place.rowBegin) * groupWidth; i += blockDim.x)
        out[(long long)(place.rowBegin + i / groupWidth) * qWidth + place.kvHead * groupWidth + i % groupWidth] = 0;
}

template <int D>
__device__ __forceinline__ void attention_tc_impl(const float* __restrict__ qkv, const bf16* __restrict__ kCache,
    const bf16* __restrict__ vCache, bf16* __restrict__ out, const int* __restrict__ positions, const int* __restrict__ seqSlot,
    const int* __restrict__ queryStart, int sequences, const int* __restrict__ blockTables, int maxBlocks, int blockSize,
    int heads, int kvHeads, int window, float scale, int qkvWidth, int heavyFirst, int rowsBelow)
{
    extern __shared__ __align__(128) unsigned char fa_shared[];
    bf16* sK = (bf16*)fa_shared;       // [2][64][D]
    bf16* sV = sK + 2 * FA_BN * D;     // [2][64][D]

    const int group = heads / kvHeads, rowTiles = (blockDim.x >> 5) / group, P = rowTiles * 16;
    // rowsBelow > 0: sequences of rowsBelow rows or more are attention_wg_*'s.
    const PromptTile place = prompt_tile(queryStart, sequences, P, 0, rowsBelow > 0 ? rowsBelow : 0x7fffffff, heavyFirst);
    if (place.seq < 0) return;
    const int kvHead = place.kvHead, rowBegin = place.rowBegin, rowEnd = place.rowEnd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int head = kvHead * group + warp % group, warpRow = rowBegin + (warp / group) * 16;
    const int qWidth = heads * D, kvWidth = kvHeads * D;
    const int slot = seqSlot[place.seq];
    if (slot < 0)
    {
        prompt_tile_zero(out, place, qWidth, group * D);
        return;
    }

    // This thread's two rows (g and g + 8 of the warp's 16) and their key ranges; −1: past the sequence's rows.
    int pos[2], low[2];
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        const int r = warpRow + g + 8 * i;
        pos[i] = r < rowEnd ? positions[r] : -1;
        low[i] = window > 0 ? pos[i] - window + 1 : 0;
    }
    const int hi = positions[rowEnd - 1], lo = window > 0 ? max(0, positions[rowBegin] - window + 1) : 0;
    const int warpHi = warpRow < rowEnd ? positions[min(warpRow + 15, rowEnd - 1)] : -1;
    const int warpLo = window > 0 && warpRow < rowEnd ? positions[warpRow] - window + 1 : 0;

    unsigned qf[D / 16][4], ql[D / 16][4];
    const float* q0 = warpRow + g < rowEnd ? qkv + (long long)(warpRow + g) * qkvWidth + head * D : nullptr;
    const float* q1 = warpRow + g + 8 < rowEnd ? qkv + (long long)(warpRow + g + 8) * qkvWidth + head * D : nullptr;
    fa_load_q<D>(qf, ql, q0, q1, scale * 1.44269504088896341f, t);

    float o[D / 8][4], m[2], l[2];
    const int first = lo / FA_BN * FA_BN;
    fa_run<D, FA_BN, 2>(qf, ql, o, m, l, sK, sV, kCache, vCache, blockTables + (long long)slot * maxBlocks, blockSize, kvWidth, kvHead,
        first, 0, (hi - first) / FA_BN + 1, hi, pos, low, warpLo, warpHi, lane);
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        const int r = warpRow + g + 8 * i;
        if (r < rowEnd) fa_write<D>(out + (long long)r * qWidth + head * D, o, l[i], i, t);
    }
}

// Decode rows on the tensor cores: one warp per (row, KV head, split), its 16 mma rows the group's query heads at the
// row's one position (rows past the group are padding). The row's key tiles (32 keys, from its window's first tile) are
// shared out over grid z in contiguous runs; with one split the warp writes the output, with more it writes a split
// record (unnormalised sums, maximum in natural-log units, total) that attention_combine merges. One stage of 32 keys
// (16 KB at D = 128), so that many warps stay resident and keep the KV reads in flight. Grid: (rows, kvHeads, splits);
// block: 32; dynamic shared memory: 2 · 32 · D bf16.
#define FA_DECODE_BN 32
template <int D>
__device__ __forceinline__ void attention_decode_tc_impl(const float* __restrict__ qkv, const bf16* __restrict__ kCache,
    const bf16* __restrict__ vCache, bf16* __restrict__ out, const int* __restrict__ positions, const int* __restrict__ rowSequence,
    const int* __restrict__ seqSlot, const int* __restrict__ blockTables, int maxBlocks, int blockSize, int heads, int kvHeads,
    int window, float scale, int qkvWidth, float* __restrict__ partial)
{
    extern __shared__ __align__(128) unsigned char fa_shared[];
    bf16* sK = (bf16*)fa_shared;
    bf16* sV = sK + FA_DECODE_BN * D;
    const int r = blockIdx.x, kvHead = blockIdx.y, lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const int group = heads / kvHeads, qWidth = heads * D, kvWidth = kvHeads * D, splits = gridDim.z;
    const int slot = seqSlot[rowSequence[r]];
    const int position = slot < 0 ? -1 : positions[r];
    const int low = window > 0 ? max(0, position - window + 1) : 0;
    const int first = low / FA_DECODE_BN * FA_DECODE_BN, tiles = position < 0 ? 0 : (position - first) / FA_DECODE_BN + 1;
    const int share = (tiles + splits - 1) / splits, tileBegin = min(tiles, (int)blockIdx.z * share), tileEnd = min(tiles, tileBegin + share);

    int pos[2], lows[2] = {low, low};
    pos[0] = g < group ? position : -1;
    pos[1] = g + 8 < group ? position : -1;
    unsigned qf[D / 16][4], ql[D / 16][4];
    const float* qRow = qkv + (long long)r * qkvWidth + kvHead * group * D;
    fa_load_q<D>(qf, ql, pos[0] >= 0 ? qRow + g * D : nullptr, pos[1] >= 0 ? qRow + (g + 8) * D : nullptr,
        scale * 1.44269504088896341f, t);
    float o[D / 8][4], m[2], l[2];
    fa_run<D, FA_DECODE_BN, 1>(qf, ql, o, m, l, sK, sV, kCache, vCache, blockTables + (long long)max(slot, 0) * maxBlocks, blockSize, kvWidth,
        kvHead, first, tileBegin, tileEnd, position, pos, lows, low, position, lane);

    float* record = partial + (((long long)r * kvHeads + kvHead) * splits + blockIdx.z) * (group * (D + 2));
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        const int h = g + 8 * i;
        if (h >= group) continue;
        if (splits == 1)
        {
            bf16* row = out + (long long)r * qWidth + (kvHead * group + h) * D;
            if (position < 0)
                for (int d = 2 * t; d < D; d += 8) *(unsigned*)(row + d) = 0u;  // a padding row
            else
                fa_write<D>(row, o, l[i], i, t);
            continue;
        }
#pragma unroll
        for (int n = 0; n < D / 8; n++)
        {
            record[h * D + n * 8 + 2 * t] = o[n][2 * i];
            record[h * D + n * 8 + 2 * t + 1] = o[n][2 * i + 1];
        }
        if (t == 0)
        {
            record[group * D + h] = m[i] * 0.69314718055994531f;  // base 2 -> natural units, as attention_combine takes them
            record[group * (D + 1) + h] = l[i];
        }
    }
}

// Decode rows with the products transposed (the default; attention_decode_tc above stays selectable to measure against):
// one warp per (row, KV head, split) as there, but the keys are the mma rows and the group's query heads the columns,
// Sᵀ = K·Qᵀ and Oᵀ = Vᵀ·Pᵀ. With at most 8 query heads per KV head the n = 8 columns hold the whole group (half of them
// padding at Mixtral's 4, where the query-head rows above are three quarters padding), so each product takes half the
// mmas, q is a B fragment (2 registers a part and k-step: D / 4 for both parts) and the output's accumulators are
// D / 4 registers instead of D / 2. At D = 128 this kernel holds 124 registers a thread against 225, so 16 warps fit on
// a multiprocessor instead of 8, and batch 256's 2,048 warps all run at once (an H200's op profile: 1.54 ms of
// attention a batch-256 step against 1.91, DRAM read at 64% of its peak against 47%; 0.78 against 0.88 ms at batch 64).
// A lane holds the scores of keys g, g + 8 for heads 2t, 2t + 1, and the output of dimensions g, g + 8 (of each 16)
// for the same two heads, so the running maximum, total and rescaling of a head stay in the lanes that own it; the
// maximum over a tile's keys is a reduction over g (lanes 4 apart). Pᵀ's accumulator layout is not the B fragment that
// Oᵀ = Vᵀ·Pᵀ takes (that wants a head's consecutive keys in one lane), so P goes through a small per-warp tile in shared
// memory as [key][8 heads] bf16 and comes back by a transposing ldmatrix. q and p enter as two bf16 parts as in
// attention_tc; the masking, the tiles at absolute positions, their shares over grid z and the split record are those of
// attention_decode_tc (with tiles of 16 keys), so a row's result still depends only on its own keys and the split count.
// Tiles of 16 keys, K and V loaded at different times: the next tile's keys load during this tile's Oᵀ product, its
// values during the next scores, so a load is always in flight with one tile of each in shared memory (9 KB a warp at
// D = 128: registers and shared memory both allow 16 warps). Measured against it on H200s (op profile, batch 256 and
// 64, ms a step): 32-key tiles in one stage 2.00 and 0.83 (17 KB a warp); 16 keys in one stage 1.55 and 0.84 (this
// kernel 1.56 and 0.77 in that call); 16 keys, K and V together, in two stages 2.08 and 0.76 (17 KB a warp).
// Grid: (rows, kvHeads, splits); block: 32; dynamic shared memory: 2 · 16 · D bf16 (K and V) + 512 bytes (Pᵀ).
#define FA_DECODE_KEYS 16

// The scores of one tile of 16 keys (at tileStart, staged in k): Sᵀ, mask (keys low ≤ j ≤ position count), the running
// maximum m and total l of the lane's heads 2t, 2t + 1 (l over the lane's own keys; summed over g at the end), the
// output rescaled, and P as the B fragments of Oᵀ += Vᵀ·Pᵀ (p: the shared tile it passes through; b: its hi part's two
// registers, then its lo part's).
template <int D>
__device__ __forceinline__ void fa_decode_scores(const unsigned (&qh)[D / 16][2], const unsigned (&ql)[D / 16][2],
    float (&o)[D / 16][4], float (&m)[2], float (&l)[2], const bf16* k, unsigned* p, int tileStart, int low, int position,
    int lane, unsigned (&b)[4])
{
    const int g = lane >> 2, t = lane & 3;
    // Sᵀ = K·Qᵀ: the tile's keys as the A fragment (row-major, as stored), q's k-step kk as B. Element e: key g + 8(e / 2),
    // head 2t + e % 2.
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
    {
        unsigned a[4];
        load_matrix_x4(shared_address(k + fa_swizzled<D>(lane & 15, kk * 2 + (lane >> 4))), a);
        mma_16x8x16(s, a, ql[kk][0], ql[kk][1]);
        mma_16x8x16(s, a, qh[kk][0], qh[kk][1]);
    }
    const bool masked = tileStart < low || tileStart + FA_DECODE_KEYS - 1 > position;
    float tileMax[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int e = 0; e < 4; e++)
    {
        const int j = tileStart + g + 8 * (e >> 1);
        if (masked && (j > position || j < low)) s[e] = NEG_INF;
        tileMax[e & 1] = fmaxf(tileMax[e & 1], s[e]);
    }
    float correction[2], base[2];
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        tileMax[i] = fmaxf(tileMax[i], __shfl_xor_sync(0xffffffffu, tileMax[i], 4));
        tileMax[i] = fmaxf(tileMax[i], __shfl_xor_sync(0xffffffffu, tileMax[i], 8));
        tileMax[i] = fmaxf(tileMax[i], __shfl_xor_sync(0xffffffffu, tileMax[i], 16));
        const float mNew = fmaxf(m[i], tileMax[i]);
        // A head with no key yet keeps m = −inf and sums of zero (its exponentials are taken against 0).
        base[i] = mNew == NEG_INF ? 0.f : mNew;
        correction[i] = exp2f(m[i] - base[i]);
        m[i] = mNew;
        l[i] *= correction[i];
    }
#pragma unroll
    for (int e = 0; e < 4; e++)
    {
        s[e] = exp2f(s[e] - base[e & 1]);
        l[e & 1] += s[e];
    }
#pragma unroll
    for (int mt = 0; mt < D / 16; mt++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[mt][e] *= correction[e & 1];
    // Pᵀ to shared memory: word 4 · key + t holds heads 2t, 2t + 1 of that key, the hi part's 16 keys, then the lo part's
    // (32 lanes store 32 consecutive words of each). Each 8 keys' 8 × 16 bytes then come back transposed, lane i
    // addressing key row i of the 32: registers 0 and 1 the hi part's B fragment (keys 2t, 2t + 1, then + 8, of head g),
    // 2 and 3 the lo part's.
#pragma unroll
    for (int h = 0; h < 2; h++)
    {
        const unsigned hi = pack_bf16x2(s[2 * h], s[2 * h + 1]);
        const int word = (8 * h + g) * 4 + t;
        p[word] = hi;
        p[4 * FA_DECODE_KEYS + word] = pack_bf16x2(s[2 * h] - lo_bf16(hi), s[2 * h + 1] - hi_bf16(hi));
    }
    __syncwarp();
    load_matrix_x4_trans(shared_address(p + lane * 4), b);
}

// Oᵀ += Vᵀ·Pᵀ for one tile of 16 keys staged in v: dimensions 16mt .. 16mt + 15 of the keys as the A fragment (the tile
// transposed), P from fa_decode_scores.
template <int D>
__device__ __forceinline__ void fa_decode_values(float (&o)[D / 16][4], const bf16* v, const unsigned (&b)[4], int lane)
{
    const int mat = lane >> 3;
#pragma unroll
    for (int mt = 0; mt < D / 16; mt++)
    {
        unsigned a[4];
        load_matrix_x4_trans(shared_address(v + fa_swizzled<D>((mat >> 1) * 8 + (lane & 7), mt * 2 + (mat & 1))), a);
        mma_16x8x16(o[mt], a, b[2], b[3]);
        mma_16x8x16(o[mt], a, b[0], b[1]);
    }
}

// Rows tileStart .. tileStart + 15 (those ≤ hi; zeros past it) of one cache's KV head into a [16][D] tile, as
// fa_load_tile does for K and V together; here the two load at different times.
template <int D>
__device__ __forceinline__ void fa_load_rows(bf16* sX, const bf16* __restrict__ cache, const int* table, int blockSize, int kvWidth,
    int kvHead, int tileStart, int hi)
{
    constexpr int CH = D / 8;
    const int c = threadIdx.x % CH, keysPerPass = blockDim.x / CH, shift = __ffs(blockSize) - 1;
    const unsigned base = shared_address(sX);
    const bf16* chunk = cache + kvHead * D + c * 8;
    for (int key = threadIdx.x / CH; key < FA_DECODE_KEYS; key += keysPerPass)
    {
        const int j = tileStart + key;
        const bool valid = j <= hi;
        const long long offset = valid ? (((long long)table[j >> shift] << shift) + (j & (blockSize - 1))) * kvWidth : 0;
        copy_async16(base + (unsigned)fa_swizzled<D>(key, c) * 2u, chunk + offset, valid);
    }
}

template <int D>
__device__ __forceinline__ void attention_decode_impl(const float* __restrict__ qkv, const bf16* __restrict__ kCache,
    const bf16* __restrict__ vCache, bf16* __restrict__ out, const int* __restrict__ positions, const int* __restrict__ rowSequence,
    const int* __restrict__ seqSlot, const int* __restrict__ blockTables, int maxBlocks, int blockSize, int heads, int kvHeads,
    int window, float scale, int qkvWidth, float* __restrict__ partial)
{
    extern __shared__ __align__(128) unsigned char fa_shared[];
    bf16* sK = (bf16*)fa_shared;                                 // [16][D]
    bf16* sV = sK + FA_DECODE_KEYS * D;                          // [16][D]
    unsigned* sP = (unsigned*)(sV + FA_DECODE_KEYS * D);         // Pᵀ: [2 parts][16 keys][4 words]
    const int r = blockIdx.x, kvHead = blockIdx.y, lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const int group = heads / kvHeads, qWidth = heads * D, kvWidth = kvHeads * D, splits = gridDim.z;
    const int slot = seqSlot[rowSequence[r]];
    const int position = slot < 0 ? -1 : positions[r];
    const int low = window > 0 ? max(0, position - window + 1) : 0;
    const int first = low / FA_DECODE_KEYS * FA_DECODE_KEYS, tiles = position < 0 ? 0 : (position - first) / FA_DECODE_KEYS + 1;
    const int share = (tiles + splits - 1) / splits, tileBegin = min(tiles, (int)blockIdx.z * share), tileEnd = min(tiles, tileBegin + share);

    // q of head g (zero past the group) as B fragments, scaled so that scores come out in base 2, each as two bf16 parts:
    // register c of k-step kk holds dimensions 16kk + 2t + 8c and the next.
    unsigned qh[D / 16][2], ql[D / 16][2];
    const float* q = g < group && position >= 0 ? qkv + (long long)r * qkvWidth + (kvHead * group + g) * D : nullptr;
    const float qScale = scale * 1.44269504088896341f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
        for (int c = 0; c < 2; c++)
        {
            const int d = kk * 16 + 2 * t + 8 * c;
            const float x = q != nullptr ? q[d] * qScale : 0.f, y = q != nullptr ? q[d + 1] * qScale : 0.f;
            qh[kk][c] = pack_bf16x2(x, y);
            ql[kk][c] = pack_bf16x2(x - lo_bf16(qh[kk][c]), y - hi_bf16(qh[kk][c]));
        }

    float o[D / 16][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int mt = 0; mt < D / 16; mt++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[mt][e] = 0.f;
    const int* table = blockTables + (long long)max(slot, 0) * maxBlocks;
    // cp.async groups in the order K₀, V₀, K₁, V₁, ...: each wait leaves only the latest group in flight.
    if (tileBegin < tileEnd)
    {
        fa_load_rows<D>(sK, kCache, table, blockSize, kvWidth, kvHead, first + tileBegin * FA_DECODE_KEYS, position);
        copy_async_commit();
        fa_load_rows<D>(sV, vCache, table, blockSize, kvWidth, kvHead, first + tileBegin * FA_DECODE_KEYS, position);
        copy_async_commit();
    }
    for (int kt = tileBegin; kt < tileEnd; kt++)
    {
        const int tileStart = first + kt * FA_DECODE_KEYS;
        copy_async_wait<1>();  // this tile's K
        __syncthreads();
        unsigned b[4];
        fa_decode_scores<D>(qh, ql, o, m, l, sK, sP, tileStart, low, position, lane, b);
        __syncthreads();  // every lane is done with K before it is refilled
        if (kt + 1 < tileEnd)
            fa_load_rows<D>(sK, kCache, table, blockSize, kvWidth, kvHead, tileStart + FA_DECODE_KEYS, position);
        copy_async_commit();  // empty after the last tile, which keeps each wait's count of groups behind it
        copy_async_wait<1>();  // this tile's V
        __syncthreads();
        fa_decode_values<D>(o, sV, b, lane);
        __syncthreads();  // every lane is done with V and Pᵀ before they are refilled
        if (kt + 1 < tileEnd)
            fa_load_rows<D>(sV, vCache, table, blockSize, kvWidth, kvHead, tileStart + FA_DECODE_KEYS, position);
        copy_async_commit();
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 4);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 8);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 16);
    }

    // Element e of o[mt]: dimension 16mt + g + 8(e / 2) of head 2t + e % 2.
    float* record = partial + (((long long)r * kvHeads + kvHead) * splits + blockIdx.z) * (group * (D + 2));
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        const int h = 2 * t + i;
        if (h >= group) continue;
        if (splits == 1)
        {
            bf16* row = out + (long long)r * qWidth + (kvHead * group + h) * D;
            const float inv = position < 0 ? 0.f : 1.f / l[i];  // 0: a padding row writes zeros
#pragma unroll
            for (int mt = 0; mt < D / 16; mt++)
#pragma unroll
                for (int e = i; e < 4; e += 2) row[mt * 16 + g + 8 * (e >> 1)] = float_to_bf16(o[mt][e] * inv);
            continue;
        }
#pragma unroll
        for (int mt = 0; mt < D / 16; mt++)
#pragma unroll
            for (int e = i; e < 4; e += 2) record[h * D + mt * 16 + g + 8 * (e >> 1)] = o[mt][e];
        if (g == 0)
        {
            record[group * D + h] = m[i] * 0.69314718055994531f;  // base 2 -> natural units, as attention_combine takes them
            record[group * (D + 1) + h] = l[i];
        }
    }
}

// ---- Prompt rows on Hopper's warpgroup MMA (attention_wg_d128_g*, sm_90a): the computation of attention_tc_d* for
// head_dim 128 (scores in base 2, q and p each as two bf16 parts, a running softmax, keys in tiles of 64 at absolute
// positions, so a row's result still depends only on its own keys), with the products on wgmma. A block takes 64
// consecutive rows of one sequence and one KV head; its G warpgroups one query head of the group each. Each warpgroup's
// q (both parts) waits in shared memory as wgmma's A operand; each tile of 64 keys and values is copied once for all G
// heads (cp.async, double-buffered). S = Q·Kᵀ reads the keys as a K-major B operand; O += P·V takes p from registers
// (the S accumulators, repacked: wgmma's register A fragment is mma.sync's) and reads the values as an MN-major B
// operand, so neither is transposed by hand. Only sequences with at least minRows rows in the step (a 64-row tile for a
// decode row would multiply 63 rows of padding; attention_tc_d* takes the others). Grid as attention_tc_d* with P = 64;
// block: 128 · G; dynamic shared memory: G · 32 KB (q) + 64 KB (keys and values, two stages), 1024-aligned.
// Shared-memory tiles are [2 halves of d][rows][64] bf16, 128-byte rows with 16-byte chunks XOR-swizzled by row mod 8
// (wgmma's 128-byte swizzle).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Element offset of chunk c (8 elements, 0..15) of row r in a [2][rows][64] tile.
template <int ROWS>
__device__ __forceinline__ int wg_swizzled(int r, int c) { return (c >> 3) * ROWS * 64 + r * 64 + (((c & 7) ^ (r & 7)) << 3); }

template <int G>
__device__ __forceinline__ void attention_wg_impl(const float* __restrict__ qkv, const bf16* __restrict__ kCache,
    const bf16* __restrict__ vCache, bf16* __restrict__ out, const int* __restrict__ positions, const int* __restrict__ seqSlot,
    const int* __restrict__ queryStart, int sequences, const int* __restrict__ blockTables, int maxBlocks, int blockSize,
    int heads, int kvHeads, int window, float scale, int qkvWidth, int heavyFirst, int minRows)
{
    constexpr int D = 128, BN = 64, ROWS = 64;
    extern __shared__ __align__(1024) unsigned char wg_shared[];
    bf16* sQ = (bf16*)wg_shared;          // [G][hi, lo][2][64][64]
    bf16* sK = sQ + G * 2 * ROWS * D;     // [2 stages][2][64][64]
    bf16* sV = sK + 2 * BN * D;           // [2 stages][2][64][64]

    const PromptTile place = prompt_tile(queryStart, sequences, ROWS, minRows, 0x7fffffff, heavyFirst);
    if (place.seq < 0) return;
    const int kvHead = place.kvHead, rowBegin = place.rowBegin, rowEnd = place.rowEnd;
    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
    const int head = kvHead * G + wg, qWidth = heads * D, kvWidth = kvHeads * D;
    const int slot = seqSlot[place.seq];
    if (slot < 0)
    {
        prompt_tile_zero(out, place, qWidth, G * D);
        return;
    }

    // This warpgroup's q, scaled so that scores come out in base 2, as two bf16 parts (padding rows zero).
    bf16* qHi = sQ + wg * 2 * ROWS * D;
    bf16* qLo = qHi + ROWS * D;
    const float qScale = scale * 1.44269504088896341f;
    for (int c = tid; c < ROWS * (D / 8); c += 128)
    {
        const int r = c >> 4, chunk = c & 15, row = rowBegin + r;
        f32x4 x0 = {0.f, 0.f, 0.f, 0.f}, x1 = x0;
        if (row < rowEnd)
        {
            const f32x4* source = (const f32x4*)(qkv + (long long)row * qkvWidth + head * D + chunk * 8);
            x0 = source[0];
            x1 = source[1];
        }
        const float x[8] = {x0.x * qScale, x0.y * qScale, x0.z * qScale, x0.w * qScale, x1.x * qScale, x1.y * qScale, x1.z * qScale, x1.w * qScale};
        unsigned h[4], l[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
        {
            h[i] = pack_bf16x2(x[2 * i], x[2 * i + 1]);
            l[i] = pack_bf16x2(x[2 * i] - lo_bf16(h[i]), x[2 * i + 1] - hi_bf16(h[i]));
        }
        const int at = wg_swizzled<ROWS>(r, chunk);
        *(u32x4*)(qHi + at) = u32x4{h[0], h[1], h[2], h[3]};
        *(u32x4*)(qLo + at) = u32x4{l[0], l[1], l[2], l[3]};
    }

    // This thread's two rows (16·warp + g and + 8 of the tile) and their key ranges; −1: past the sequence's rows.
    int pos[2], low[2];
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
        const int r = rowBegin + 16 * warp + g + 8 * i;
        pos[i] = r < rowEnd ? positions[r] : -1;
        low[i] = window > 0 ? pos[i] - window + 1 : 0;
    }
    const int hi = positions[rowEnd - 1], lo = window > 0 ? max(0, positions[rowBegin] - window + 1) : 0;
    const int first = lo / BN * BN, tiles = (hi - first) / BN + 1;

    // Keys tileStart .. tileStart + 63 (zeros past hi) into a stage: every thread of the block copies 16-byte chunks.
    const int* table = blockTables + (long long)slot * maxBlocks;
    const int shift = __ffs(blockSize) - 1;
    auto load = [&](int stage, int tileStart) {
        const unsigned kBase = shared_address(sK + stage * BN * D), vBase = shared_address(sV + stage * BN * D);
        for (int c = threadIdx.x; c < BN * (D / 8); c += blockDim.x)
        {
            const int key = c >> 4, chunk = c & 15, j = tileStart + key;
            const bool valid = j <= hi;
            const long long offset = valid ? (((long long)table[j >> shift] << shift) + (j & (blockSize - 1))) * kvWidth + kvHead * D + chunk * 8 : 0;
            const unsigned to = (unsigned)wg_swizzled<BN>(key, chunk) * 2u;
            copy_async16(kBase + to, kCache + offset, valid);
            copy_async16(vBase + to, vCache + offset, valid);
        }
    };

    float o[D / 2], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.f;
    const unsigned long long dHi = wgmma_descriptor(qHi), dLo = wgmma_descriptor(qLo);
    load(0, first);
    copy_async_commit();
    for (int kt = 0; kt < tiles; kt++)
    {
        const int stage = kt & 1, tileStart = first + kt * BN;
        if (kt + 1 < tiles) load(stage ^ 1, tileStart + BN);
        copy_async_commit();
        copy_async_wait<1>();
        fence_proxy_async();  // this thread's copies (and q's stores) before wgmma's reads
        __syncthreads();

        // S = Q·Kᵀ over d in 8 steps of 16 (+32 bytes a step within a 64-wide half, +8 KB to the next half), lo part first.
        float s[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; i++) s[i] = 0.f;
        const unsigned long long dK = wgmma_descriptor(sK + stage * BN * D);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
        {
            const unsigned step = (kk >> 2) * (ROWS * 64 * 2 / 16) + (kk & 3) * 2, keyStep = (kk >> 2) * (BN * 64 * 2 / 16) + (kk & 3) * 2;
            wgmma_m64n64k16(s, dLo + step, dK + keyStep, 1);
            wgmma_m64n64k16(s, dHi + step, dK + keyStep, 1);
        }
        wgmma_commit();
        wgmma_wait<0>();

        // Mask (only where some row of the warp sees part of the tile), running maximum and sums, as fa_tile.
        bool whole = true;
#pragma unroll
        for (int i = 0; i < 2; i++) whole &= pos[i] < 0 || (low[i] <= tileStart && tileStart + BN - 1 <= pos[i]);
        const bool masked = !__all_sync(0xffffffffu, whole);
        float tileMax[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int i = 0; i < BN / 2; i++)
        {
            const int r = (i >> 1) & 1, j = tileStart + 8 * (i >> 2) + 2 * q + (i & 1);
            if (masked && (j > pos[r] || j < low[r])) s[i] = NEG_INF;
            tileMax[r] = fmaxf(tileMax[r], s[i]);
        }
        float base[2], correction[2];
#pragma unroll
        for (int r = 0; r < 2; r++)
        {
            tileMax[r] = fmaxf(tileMax[r], __shfl_xor_sync(0xffffffffu, tileMax[r], 1));
            tileMax[r] = fmaxf(tileMax[r], __shfl_xor_sync(0xffffffffu, tileMax[r], 2));
            const float mNew = fmaxf(m[r], tileMax[r]);
            base[r] = mNew == NEG_INF ? 0.f : mNew;  // a row with no key yet keeps m = −inf and sums of zero
            correction[r] = exp2f(m[r] - base[r]);
            m[r] = mNew;
            l[r] *= correction[r];
        }
#pragma unroll
        for (int i = 0; i < BN / 2; i++)
        {
            const int r = (i >> 1) & 1;
            s[i] = exp2f(s[i] - base[r]);
            l[r] += s[i];
        }
#pragma unroll
        for (int i = 0; i < D / 2; i++) o[i] *= correction[(i >> 1) & 1];

        // O += P·V over the keys in 4 steps of 16: p's parts from the accumulators of n-tiles 2kk and 2kk + 1; the
        // values as an MN-major B operand (the d halves 8 KB apart, +2 KB a step of 16 keys).
        unsigned ph[BN / 16][4], pl[BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++)
#pragma unroll
            for (int e = 0; e < 4; e++)
            {
                const float a = s[8 * kk + 2 * e], b = s[8 * kk + 2 * e + 1];
                ph[kk][e] = pack_bf16x2(a, b);
                pl[kk][e] = pack_bf16x2(a - lo_bf16(ph[kk][e]), b - hi_bf16(ph[kk][e]));
            }
        const bf16* vTile = sV + stage * BN * D;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++)
        {
            const unsigned long long dV = wgmma_descriptor_mn(vTile + kk * 16 * 64, BN * 64 * 2);
            wgmma_m64n128k16_rt(o, pl[kk], dV);
            wgmma_m64n128k16_rt(o, ph[kk], dV);
        }
        wgmma_commit();
        wgmma_wait<0>();
        __syncthreads();  // every warpgroup is done with this stage before it is refilled
    }

#pragma unroll
    for (int r = 0; r < 2; r++)
    {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const int row = rowBegin + 16 * warp + g + 8 * r;
        if (row >= rowEnd) continue;
        const float inv = 1.f / l[r];
        bf16* target = out + (long long)row * qWidth + head * D + 2 * q;
#pragma unroll
        for (int j = 0; j < D / 8; j++) *(unsigned*)(target + 8 * j) = pack_bf16x2(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
    }
}

#define ATTENTION_WG_BODY(G) attention_wg_impl<G>(qkv, kCache, vCache, out, positions, seqSlot, queryStart, sequences, blockTables, \
    maxBlocks, blockSize, heads, kvHeads, window, scale, qkvWidth, heavyFirst, minRows);
#else
#define ATTENTION_WG_BODY(G) __trap();
#endif

#define ATTENTION_WG_KERNEL(G) \
    extern "C" __global__ void __launch_bounds__(128 * G, 1) attention_wg_d128_g##G(const float* __restrict__ qkv, \
        const bf16* __restrict__ kCache, const bf16* __restrict__ vCache, bf16* __restrict__ out, const int* __restrict__ positions, \
        const int* __restrict__ seqSlot, const int* __restrict__ queryStart, int sequences, const int* __restrict__ blockTables, \
        int maxBlocks, int blockSize, int heads, int kvHeads, int window, float scale, int qkvWidth, int heavyFirst, int minRows) \
    { kernel_prologue(); ATTENTION_WG_BODY(G) }

ATTENTION_WG_KERNEL(1) ATTENTION_WG_KERNEL(2) ATTENTION_WG_KERNEL(4)

#define ATTENTION_TC_KERNEL(D) \
    extern "C" __global__ void __launch_bounds__(256) attention_tc_d##D(const float* __restrict__ qkv, const bf16* __restrict__ kCache, \
        const bf16* __restrict__ vCache, bf16* __restrict__ out, const int* __restrict__ positions, const int* __restrict__ seqSlot, \
        const int* __restrict__ queryStart, int sequences, const int* __restrict__ blockTables, int maxBlocks, int blockSize, \
        int heads, int kvHeads, int window, float scale, int qkvWidth, int heavyFirst, int rowsBelow) \
    { kernel_prologue(); \
        attention_tc_impl<D>(qkv, kCache, vCache, out, positions, seqSlot, queryStart, sequences, blockTables, maxBlocks, blockSize, \
            heads, kvHeads, window, scale, qkvWidth, heavyFirst, rowsBelow); \
    } \
    extern "C" __global__ void __launch_bounds__(32) attention_decode_tc_d##D(const float* __restrict__ qkv, const bf16* __restrict__ kCache, \
        const bf16* __restrict__ vCache, bf16* __restrict__ out, const int* __restrict__ positions, const int* __restrict__ rowSequence, \
        const int* __restrict__ seqSlot, const int* __restrict__ blockTables, int maxBlocks, int blockSize, int heads, int kvHeads, \
        int window, float scale, int qkvWidth, float* __restrict__ partial) \
    { kernel_prologue(); \
        attention_decode_tc_impl<D>(qkv, kCache, vCache, out, positions, rowSequence, seqSlot, blockTables, maxBlocks, blockSize, \
            heads, kvHeads, window, scale, qkvWidth, partial); \
    } \
    extern "C" __global__ void __launch_bounds__(32) attention_decode_d##D(const float* __restrict__ qkv, const bf16* __restrict__ kCache, \
        const bf16* __restrict__ vCache, bf16* __restrict__ out, const int* __restrict__ positions, const int* __restrict__ rowSequence, \
        const int* __restrict__ seqSlot, const int* __restrict__ blockTables, int maxBlocks, int blockSize, int heads, int kvHeads, \
        int window, float scale, int qkvWidth, float* __restrict__ partial) \
    { kernel_prologue(); \
        attention_decode_impl<D>(qkv, kCache, vCache, out, positions, rowSequence, seqSlot, blockTables, maxBlocks, blockSize, \
            heads, kvHeads, window, scale, qkvWidth, partial); \
    }

ATTENTION_TC_KERNEL(16) ATTENTION_TC_KERNEL(32) ATTENTION_TC_KERNEL(64) ATTENTION_TC_KERNEL(128)
