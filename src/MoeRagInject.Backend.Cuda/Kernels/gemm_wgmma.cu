// Grouped GEMM for the MoE experts on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a), for groups of tens to
// hundreds of rows. The expert's weights are wgmma's A operand (64 weight rows a tile: M) and the group's rows its B
// operand (N = 16 to 256 rows a tile), so a small group still fills the instruction and the weights stream through once
// per row tile. Both are staged by cp.async into 128-byte-swizzled shared memory (the layout gemm.cu's `swizzled` writes,
// which is the one wgmma's descriptors read with swizzle mode 128B), STAGES deep; one warpgroup (128 threads) a block, or
// two (the _m128 kernels: 128 weight rows a tile, each warpgroup 64 of them against the same rows).
// As in gemm.cu, the groups' row ranges come from device memory (offsets) and the grid is a fixed bound, so a captured
// graph replays it whatever the routing; rows of a gate-up GEMM are gathered through the expert sort (sorted[p] / topK).
// Gate-up mode: a tile's 64 weight rows are 32 features' gate and up rows interleaved by eights (rows 16w .. 16w + 7 the
// gates of features 8w .. 8w + 7, rows 16w + 8 .. 16w + 15 their ups), so that each thread's accumulators hold a
// feature's gate and up for the same rows and the epilogue writes act = silu(gate) · up as bf16 directly. Down mode
// writes fp32 y; with offsets null it is a plain projection of `rows` rows (--deterministic's linear, k split by grid z).
// k must be a multiple of 64. Grid: (row tiles, bound included, feature tiles: ⌈n / (32·WG)⌉ gate-up, ⌈n / (64·WG)⌉
// down); block: 128·WG; dynamic shared memory: STAGES · (64·WG + N) · 128 bytes, 1024-aligned.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

template <int N>
__device__ __forceinline__ void wgmma_step(float* d, unsigned long long a, unsigned long long b)
{
    if (N == 16) wgmma_m64n16k16(d, a, b, 1);
    else if (N == 32) wgmma_m64n32k16(d, a, b, 1);
    else if (N == 64) wgmma_m64n64k16(d, a, b, 1);
    else if (N == 96) wgmma_m64n96k16(d, a, b, 1);
    else if (N == 128) wgmma_m64n128k16(d, a, b, 1);
    else wgmma_m64n256k16(d, a, b, 1);
}

template <int N>
struct WgmmaStages { static constexpr int value = N >= 128 ? 4 : 6; };

// Stages of the two-warpgroup kernel (128 weight rows a block): (128 + N) · 128 bytes each.
template <int N, int WG>
struct WgmmaStagesOf { static constexpr int value = WG == 1 ? WgmmaStages<N>::value : N >= 256 ? 3 : 4; };

// WG warpgroups a block, each taking 64 of the tile's 64·WG weight rows against the same N rows: WG = 2 halves how often
// the rows are read from L2 (once a weight tile) and doubles the products a barrier covers, for groups of 64 rows and
// more. WG = 1 is the one-warpgroup kernel exactly.
template <int N, int WG, bool GATE_UP>
__device__ __forceinline__ void moe_wgmma_impl(const bf16* __restrict__ a, const bf16* __restrict__ w, const int* __restrict__ offsets,
    const int* __restrict__ sorted, int groups, int rows, int topK, int n, int k, bf16* __restrict__ act, float* __restrict__ y,
    long long splitStride)
{
    constexpr int STAGES = WgmmaStagesOf<N, WG>::value, M = 64 * WG, PASS = 16 * WG, B_LOADS = N / PASS;
    static_assert(N % PASS == 0, "a pass of the block's threads copies 16·WG rows");
    extern __shared__ __align__(1024) unsigned char wgmma_shared[];
    bf16* tileW = (bf16*)wgmma_shared;                 // [STAGES][M][64]
    bf16* tileA = tileW + STAGES * M * GEMM_BK;        // [STAGES][N][64]

    int group = -1, rowBegin = 0, rowEnd = 0;
    if (offsets == nullptr)
    {
        // One group of `rows` rows, read in place (a projection: --deterministic's linear).
        if ((int)blockIdx.x * N < rows) { group = 0; rowBegin = blockIdx.x * N; rowEnd = rows; }
    }
    else
    {
        int tile = blockIdx.x;
        for (int g = 0; g < groups; g++)
        {
            const int begin = offsets[g], end = offsets[g + 1], tiles = (end - begin + N - 1) / N;
            if (tile < tiles) { group = g; rowBegin = begin + tile * N; rowEnd = end; break; }
            tile -= tiles;
        }
    }
    if (group < 0) return;

    // wg: this thread's warpgroup (a constant 0 in the one-warpgroup kernels, so that they compile as before the template).
    const int tid = threadIdx.x, chunk = tid & 7, firstRow = tid >> 3, wg = WG == 1 ? 0 : tid >> 7;  // rows firstRow + PASS·j of each tile
    // The weight rows this thread copies (tile rows t = firstRow + PASS·j; warpgroup t / 64 multiplies them): element
    // offsets into w, −1 past the expert's rows.
    long long wOffset[4];
#pragma unroll
    for (int j = 0; j < 4; j++)
    {
        const int t = firstRow + PASS * j, r = t & 63;
        int row;
        if (GATE_UP)
        {
            // Warpgroup t / 64's 32 features; its row r: the gate (r mod 16 < 8) or up row of feature 8·(r / 16) + r mod 8.
            const int feature = blockIdx.y * 32 * WG + (t >> 6) * 32 + (r >> 4) * 8 + (r & 7);
            row = feature < n ? ((r & 15) < 8 ? feature : n + feature) : -1;
        }
        else
        {
            const int feature = blockIdx.y * M + t;
            row = feature < n ? feature : -1;
        }
        wOffset[j] = row < 0 ? -1 : ((long long)group * (GATE_UP ? 2 : 1) * n + row) * k + chunk * 8;
    }
    int aOffset[B_LOADS];
#pragma unroll
    for (int j = 0; j < B_LOADS; j++)
    {
        const int p = rowBegin + firstRow + j * PASS;
        aOffset[j] = p >= rowEnd ? -1 : (GATE_UP ? sorted[p] / topK : p) * k + chunk * 8;
    }

    // Down products may split k over grid z (--deterministic at few rows: more blocks streaming the weights); split z
    // writes its partial sums at y + z·splitStride, which moe_combine_grouped adds in split order. The split count comes
    // from the weight's shape alone, so each row is still summed the same way at every batch size.
    const int kTilesAll = k / GEMM_BK;
    const int kBegin = (int)((long long)kTilesAll * blockIdx.z / gridDim.z);
    const int kTiles = (int)((long long)kTilesAll * (blockIdx.z + 1) / gridDim.z) - kBegin;
    if (!GATE_UP) y += blockIdx.z * splitStride;
    auto load = [&](int stage, int kt) {
        bf16* sw = tileW + stage * M * GEMM_BK;
        bf16* sa = tileA + stage * N * GEMM_BK;
        const int kOffset = (kBegin + kt) * GEMM_BK;
#pragma unroll
        for (int j = 0; j < 4; j++)
            copy_async16(shared_address(sw + swizzled(firstRow + j * PASS, chunk)), w + (wOffset[j] >= 0 ? wOffset[j] + kOffset : 0), wOffset[j] >= 0);
#pragma unroll
        for (int j = 0; j < B_LOADS; j++)
            copy_async16(shared_address(sa + swizzled(firstRow + j * PASS, chunk)), a + (aOffset[j] >= 0 ? aOffset[j] + kOffset : 0), aOffset[j] >= 0);
    };

    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; i++) d[i] = 0.f;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++)
    {
        if (s < kTiles) load(s, s);
        copy_async_commit();
    }
    // Tile kt's products run while tile kt − 1's stage is refilled: the wgmma group of kt − 1 is waited for (at most one
    // group left in flight), then a barrier, and only then is that stage overwritten.
    for (int kt = 0; kt < kTiles; kt++)
    {
        copy_async_wait<STAGES - 2>();
        fence_proxy_async();
        __syncthreads();  // tile kt is in shared memory for every thread
        // This warpgroup's 64 weight rows of the stage (8 KB apart, so still 1024-aligned).
        const unsigned long long dw = wgmma_descriptor(tileW + (kt % STAGES) * M * GEMM_BK + wg * 64 * GEMM_BK);
        const unsigned long long da = wgmma_descriptor(tileA + (kt % STAGES) * N * GEMM_BK);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < GEMM_BK / 16; kk++) wgmma_step<N>(d, dw + 2 * kk, da + 2 * kk);  // +32 bytes a step of 16
        wgmma_commit();
        wgmma_wait<1>();
        __syncthreads();  // every warp's products of tile kt − 1 are done: its stage may be refilled
        const int next = kt + STAGES - 1;
        if (next < kTiles) load(next % STAGES, next);
        copy_async_commit();
    }
    wgmma_wait<0>();
    copy_async_wait<0>();

    // Accumulator 4i + e (e < 2): weight row 16·warp + g of the warpgroup's 64, group row 8i + 2t + e; 4i + 2 + e: weight
    // row 16·warp + g + 8.
    const int warp = WG == 1 ? tid >> 5 : (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < N / 8; i++)
#pragma unroll
        for (int e = 0; e < 2; e++)
        {
            const int p = rowBegin + 8 * i + 2 * t + e;
            if (p >= rowEnd) continue;
            if (GATE_UP)
            {
                const int feature = blockIdx.y * 32 * WG + wg * 32 + warp * 8 + g;
                if (feature < n) act[(long long)p * n + feature] = float_to_bf16(silu(d[4 * i + e]) * d[4 * i + 2 + e]);
            }
            else
            {
                const int feature = blockIdx.y * M + wg * 64 + warp * 16 + g;
                if (feature < n) y[(long long)p * n + feature] = d[4 * i + e];
                if (feature + 8 < n) y[(long long)p * n + feature + 8] = d[4 * i + 2 + e];
            }
        }
}

#define MOE_WGMMA_BODY(N, WG, GATE_UP) moe_wgmma_impl<N, WG, GATE_UP>(a, w, offsets, sorted, groups, rows, topK, n, k, act, y, splitStride);
#else
#define MOE_WGMMA_BODY(N, WG, GATE_UP) __trap();
#endif

// moe_wgmma_{gate_up,down}_n<N>: one warpgroup, 64 weight rows a block; ..._n<N>_m128: two warpgroups, 128 weight rows.
#define MOE_WGMMA(N, WG, NAME) \
    extern "C" __global__ void __launch_bounds__(128 * WG) moe_wgmma_gate_up_##NAME(const bf16* __restrict__ a, const bf16* __restrict__ w, \
        const int* __restrict__ offsets, const int* __restrict__ sorted, int groups, int rows, int topK, int n, int k, bf16* __restrict__ act, \
        float* __restrict__ y, long long splitStride) { kernel_prologue(); MOE_WGMMA_BODY(N, WG, true) } \
    extern "C" __global__ void __launch_bounds__(128 * WG) moe_wgmma_down_##NAME(const bf16* __restrict__ a, const bf16* __restrict__ w, \
        const int* __restrict__ offsets, const int* __restrict__ sorted, int groups, int rows, int topK, int n, int k, bf16* __restrict__ act, \
        float* __restrict__ y, long long splitStride) { kernel_prologue(); MOE_WGMMA_BODY(N, WG, false) }

MOE_WGMMA(16, 1, n16) MOE_WGMMA(32, 1, n32) MOE_WGMMA(64, 1, n64) MOE_WGMMA(128, 1, n128) MOE_WGMMA(256, 1, n256)
MOE_WGMMA(64, 2, n64_m128) MOE_WGMMA(128, 2, n128_m128) MOE_WGMMA(256, 2, n256_m128)

// ---- The TMA-fed, warp-specialised kernels (moe_tma_*): the same products, for decode batches from 8 rows (in the engine
// they beat the kernels above there; below 64 rows, in a hot loop, not always: L2 then holds what a step would not).
// A block is three warpgroups: one thread of the first issues the tensor-memory-access copies (cp.async.bulk.tensor) of
// each k-tile into a ring of STAGES shared-memory stages, and the other two multiply (wgmma) against the same N group
// rows; mbarriers hand each stage from copier to multipliers (full: the copies' bytes have landed) and back (empty: all
// eight multiplying warps are done reading it). The grid is persistent, one block a multiprocessor, and walks the tiles
// (row tile, feature tile) in steps of the grid, so the copier fills the next tile's stages while the multipliers write
// the last one's results. Row tiles and groups come from offsets in device memory, as above.
// Weights come through a 2-D tensor map over all experts' rows ([experts · rows an expert, k], boxes of 128 rows):
// gate-up tiles are 128 features, a stage their 128 gate rows then their 128 up rows, and each multiplying warpgroup
// keeps two accumulator sets, gate and up of its 64 features, so that silu(gate) · up pairs register with register
// (hence N ≤ 128 there); down tiles are 128 features, 64 a warpgroup, or in the wide form (moe_tma_down_wide_*) 256
// features, a stage two boxes of 128 weight rows and each warpgroup two accumulator sets as in gate-up, so that every
// group row copied into shared memory serves twice the weight rows (at batch 256 a narrow down tile copies 96 rows of
// 14,336 activations for its 128 weight rows: three quarters of its weight bytes again). The group rows come through a
// 2-D map over a sorted bf16 buffer (moe_gather's for gate-up, the activations for down), box N rows, rows past the
// buffer read as zeros. n must be a multiple of 128 (of 256 for the wide form), k of 64.

// A CUtensorMap (cuTensorMapEncodeTiled): 128 opaque bytes, passed by value as a __grid_constant__ parameter.
struct alignas(64) TensorMap { unsigned long long opaque[16]; };

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void barrier_init(unsigned barrier, unsigned count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(count) : "memory");
}

// The ring's barriers, initialised by thread 0 (full: the copier's one arrival with the stage's bytes; empty: the eight
// multiplying warps' arrivals) and made visible to the copies, before any thread of the block goes on.
__device__ __forceinline__ void stage_barriers_init(unsigned full0, unsigned empty0, int stages)
{
    if (threadIdx.x == 0)
    {
        for (int s = 0; s < stages; s++)
        {
            barrier_init(full0 + 8 * s, 1);
            barrier_init(empty0 + 8 * s, 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
}

// One arrival that also expects `bytes` from copies completing on this barrier.
__device__ __forceinline__ void barrier_expect(unsigned barrier, unsigned bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(barrier), "r"(bytes) : "memory");
}

__device__ __forceinline__ void barrier_arrive(unsigned barrier)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(barrier) : "memory");
}

// Spins until the barrier's phase of this parity has completed (a fresh barrier counts its phase of parity 1 as done).
__device__ __forceinline__ void barrier_wait(unsigned barrier, unsigned parity)
{
    unsigned done;
    do asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                    : "=r"(done) : "r"(barrier), "r"(parity) : "memory");
    while (!done);
}

// The box of the 2-D map at (column c0, row c1) into shared memory; its bytes complete on the barrier.
__device__ __forceinline__ void tma_load(unsigned destination, const TensorMap* map, int c0, int c1, unsigned barrier)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 ::"r"(destination), "l"((unsigned long long)map), "r"(c0), "r"(c1), "r"(barrier) : "memory");
}

// `bytes` contiguous bytes of global memory into shared memory (cp.async.bulk, no tensor map); they complete on the barrier.
__device__ __forceinline__ void bulk_load(unsigned destination, const void* source, unsigned bytes, unsigned barrier)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(destination), "l"(source), "r"(bytes), "r"(barrier) : "memory");
}

// The 16 KB box of weight rows 128p .. 128p + 127 and k-tile kt in the boxed layout (moe_box_weights).
__device__ __forceinline__ const unsigned char* boxed_tile(const unsigned char* boxed, int weightRow, int kTiles, int kt)
{
    return boxed + ((long long)(weightRow >> 7) * kTiles + kt) * 16384;
}

// Weight rows a stage: two boxes of 128 (gate-up: 128 features' gate and up rows; wide down: 256 features' rows), or
// one (128 down rows). Stages: as many as fit in 200 KB, at most 8.
template <bool TWO_BOXES>
struct TmaWeightRows { static constexpr int value = TWO_BOXES ? 256 : 128; };
template <int N, bool TWO_BOXES>
struct TmaStages
{
    static constexpr int raw = 200 * 1024 / ((TmaWeightRows<TWO_BOXES>::value + N) * 128);
    static constexpr int value = raw > 8 ? 8 : raw;
};

// A row tile's group and rows, in the order the groups' tiles come (as moe_wgmma_impl finds them).
template <int N>
__device__ __forceinline__ void tma_locate(const int* __restrict__ offsets, int groups, int tile, int& group, int& rowBegin, int& rowEnd)
{
    for (int g = 0; g < groups; g++)
    {
        const int begin = offsets[g], end = offsets[g + 1], tiles = (end - begin + N - 1) / N;
        if (tile < tiles) { group = g; rowBegin = begin + tile * N; rowEnd = end; return; }
        tile -= tiles;
    }
}

// A moe_tma tile's products over k-tiles [kBegin, kEnd) at instruction width WIDTH (≤ N): each stage's W weight rows
// (this warpgroup's 64 of each box of 128) against its N group rows, into d (and u, the second box); each stage handed
// back to the copier once its products are done.
template <int WIDTH, bool TWO, int W, int N>
__device__ __forceinline__ void tma_products(float* d, float* u, const bf16* tileW, const bf16* tileA, unsigned full0, unsigned empty0,
    int half, int lane, int kBegin, int kEnd, int& stage, unsigned& phase)
{
    constexpr int STAGES = TmaStages<N, TWO>::value;
    int previous = -1;
    for (int kt = kBegin; kt < kEnd; kt++)
    {
        barrier_wait(full0 + 8 * stage, phase);
        // This warpgroup's 64 weight rows (its features' gates, and 128 rows on, their ups; wide down: 64 of each box).
        const bf16* mine = tileW + stage * W * GEMM_BK + half * 64 * GEMM_BK;
        const unsigned long long dw = wgmma_descriptor(mine), da = wgmma_descriptor(tileA + stage * N * GEMM_BK);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < GEMM_BK / 16; kk++) wgmma_step<WIDTH>(d, dw + 2 * kk, da + 2 * kk);
        if (TWO)
        {
            const unsigned long long du = wgmma_descriptor(mine + 128 * GEMM_BK);
#pragma unroll
            for (int kk = 0; kk < GEMM_BK / 16; kk++) wgmma_step<WIDTH>(u, du + 2 * kk, da + 2 * kk);
        }
        wgmma_commit();
        wgmma_wait<1>();  // the products of the previous stage are done: hand it back
        if (previous >= 0 && lane == 0) barrier_arrive(empty0 + 8 * previous);
        previous = stage;
        if (++stage == STAGES) { stage = 0; phase ^= 1; }
    }
    wgmma_wait<0>();
    wgmma_fence_operands<WIDTH / 2>(d);
    if constexpr (TWO) wgmma_fence_operands<WIDTH / 2>(u);
    if (previous >= 0 && lane == 0) barrier_arrive(empty0 + 8 * previous);
}

template <int N, bool GATE_UP, bool WIDE>
__device__ __forceinline__ void moe_tma_impl(const TensorMap* weights, const unsigned char* __restrict__ boxed, const TensorMap* rows,
    const int* __restrict__ offsets, int groups, int n, int k, bf16* __restrict__ act, float* __restrict__ y, int fitRows, int splits,
    long long splitStride)
{
    constexpr bool TWO = GATE_UP || WIDE;  // two boxes of weight rows a stage, two accumulator sets a warpgroup
    static_assert(!(GATE_UP && WIDE), "the wide form is a down product");
    static_assert(!TWO || N <= 128, "two accumulator sets");
    constexpr int STAGES = TmaStages<N, TWO>::value, W = TmaWeightRows<TWO>::value, FEATURES = WIDE ? 256 : 128;
    constexpr unsigned STAGE_BYTES = (W + N) * GEMM_BK * 2;
    extern __shared__ __align__(1024) unsigned char tma_shared[];
    bf16* tileW = (bf16*)tma_shared;                  // [STAGES][W][64], 128-byte swizzled by the copies
    bf16* tileA = tileW + STAGES * W * GEMM_BK;       // [STAGES][N][64]
    const unsigned full0 = shared_address(tileA + STAGES * N * GEMM_BK), empty0 = full0 + 8 * STAGES;

    const int tid = threadIdx.x, role = tid >> 7;
    int rowTiles = 0;
    for (int g = 0; g < groups; g++) rowTiles += (offsets[g + 1] - offsets[g] + N - 1) / N;
    // A unit: a row tile, a feature tile and a share of k (splits outermost; down products only, the shares' sums at
    // splitStride floats apart for moe_combine_grouped to add in order).
    const int tiles = rowTiles * (n / FEATURES), units = tiles * splits, kTiles = k / GEMM_BK, expertRows = GATE_UP ? 2 * n : n;
    stage_barriers_init(full0, empty0, STAGES);

    if (role == 0)
    {
        // As in moe_tma_tokens_impl: registers to the multiplying warpgroups (two sets of 64 accumulators at N = 128).
        registers_release<40>();
        if (tid != 0) return;
        int stage = 0;
        unsigned phase = 0;
        for (int unit = blockIdx.x; unit < units; unit += gridDim.x)
        {
            const int t = unit % tiles, split = unit / tiles;
            int group = 0, rowBegin = 0, rowEnd = 0;
            tma_locate<N>(offsets, groups, t % rowTiles, group, rowBegin, rowEnd);
            const int weightRow = group * expertRows + (t / rowTiles) * FEATURES;
            for (int kt = split * kTiles / splits; kt < (split + 1) * kTiles / splits; kt++)
            {
                barrier_wait(empty0 + 8 * stage, phase ^ 1);
                const unsigned full = full0 + 8 * stage, sw = shared_address(tileW + stage * W * GEMM_BK);
                barrier_expect(full, STAGE_BYTES);
                // The second box: the same features' up rows (gate-up), or the next 128 features' rows (wide down).
                const int secondRow = weightRow + (GATE_UP ? n : 128);
                if (boxed != nullptr)
                {
                    bulk_load(sw, boxed_tile(boxed, weightRow, kTiles, kt), 16384, full);
                    if (TWO) bulk_load(sw + 128 * 128, boxed_tile(boxed, secondRow, kTiles, kt), 16384, full);
                }
                else
                {
                    tma_load(sw, weights, kt * GEMM_BK, weightRow, full);
                    if (TWO) tma_load(sw + 128 * 128, weights, kt * GEMM_BK, secondRow, full);
                }
                tma_load(shared_address(tileA + stage * N * GEMM_BK), rows, kt * GEMM_BK, rowBegin, full);
                if (++stage == STAGES) { stage = 0; phase ^= 1; }
            }
        }
        return;
    }

    registers_claim<232>();
    const int half = role - 1, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, q = lane & 3;
    int stage = 0;
    unsigned phase = 0;
    float d[N / 2], u[TWO ? N / 2 : 1];
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x)
    {
        const int t = unit % tiles, split = unit / tiles;
        float* ys = y + split * splitStride;
        int group = 0, rowBegin = 0, rowEnd = 0;
        tma_locate<N>(offsets, groups, t % rowTiles, group, rowBegin, rowEnd);
        const int featureTile = t / rowTiles;
        // The tile's group rows (fitRows: the multiplications narrowed to them; otherwise all N, padding included).
        const int live = fitRows ? min(N, rowEnd - rowBegin) : N;
#pragma unroll
        for (int i = 0; i < N / 2; i++) d[i] = 0.f;
        if (TWO)
#pragma unroll
            for (int i = 0; i < N / 2; i++) u[i] = 0.f;
        const int kBegin = split * kTiles / splits, kEnd = (split + 1) * kTiles / splits;
        // The narrowest instruction width up to N that covers the tile's live rows (the accumulators of the first columns
        // sit in the same registers at every width, and the rest stay zero), so that a tile of 96 rows for a group of 64
        // spends no tensor-core time, nor power, on its padding. The width is chosen once a tile, outside the k-loop: a
        // choice between widths at each instruction made ptxas wait for every wgmma before issuing the next (seen in the
        // SASS: a full WARPGROUP.DEPBAR after each HGMMA).
#define TMA_PRODUCTS(WIDTH) tma_products<WIDTH, TWO, W, N>(d, u, tileW, tileA, full0, empty0, half, lane, kBegin, kEnd, stage, phase)
        if (N >= 32 && live <= 16) TMA_PRODUCTS(16);
        else if (N >= 64 && live <= 32) TMA_PRODUCTS(32);
        else if (N >= 96 && live <= 64) TMA_PRODUCTS(64);
        else if (N >= 128 && live <= 96) TMA_PRODUCTS(96);
        else if (N >= 256 && live <= 128) TMA_PRODUCTS(128);
        else TMA_PRODUCTS(N);
#undef TMA_PRODUCTS

        // Accumulator 4i + e (e < 2): weight row 16·warp + g of the warpgroup's 64, group row 8i + 2q + e; 4i + 2 + e:
        // weight row 16·warp + g + 8 (u: the same rows of the second box).
        const int feature = featureTile * FEATURES + half * 64 + warp * 16 + g;
#pragma unroll
        for (int i = 0; i < N / 8; i++)
#pragma unroll
            for (int e = 0; e < 2; e++)
            {
                const int p = rowBegin + 8 * i + 2 * q + e;
                if (p >= rowEnd) continue;
                if (GATE_UP)
                {
                    act[(long long)p * n + feature] = float_to_bf16(silu(d[4 * i + e]) * u[4 * i + e]);
                    act[(long long)p * n + feature + 8] = float_to_bf16(silu(d[4 * i + 2 + e]) * u[4 * i + 2 + e]);
                }
                else
                {
                    ys[(long long)p * n + feature] = d[4 * i + e];
                    ys[(long long)p * n + feature + 8] = d[4 * i + 2 + e];
                    if (WIDE)
                    {
                        ys[(long long)p * n + feature + 128] = u[4 * i + e];
                        ys[(long long)p * n + feature + 136] = u[4 * i + 2 + e];
                    }
                }
            }
    }
}

// ---- The same products for prefill chunks (moe_tma_tokens_*): groups of hundreds of rows, where the products, not the
// weights' bytes, set the pace. The roles of the operands swap: a tile is 128 group rows (wgmma's M, 64 a multiplying
// warpgroup, from a 2-D map over the sorted rows) against 256 weight rows (N = 256, the widest instruction: gate-up 128
// features' gate rows then their up rows, so that a thread holds a feature's gate in accumulator r and its up in r + 64;
// down 256 features), so each copied weight row serves 128 group rows and each group row 256 weight rows. Weights come
// by the tensor map (row-major) or as bulk copies of the boxed layout. Persistent; the tiles are walked group by group,
// each group's feature tiles in turn and a feature tile's row tiles innermost, so that the blocks at work share each
// weight tile and hold one group's rows in L2 (walked row tiles first, as moe_tma_impl walks, a 2,048-row gate-up read
// 6.5 GB from DRAM for its 1.9 GB of weights, and took 5% longer; walked so, 3.9 GB, by ncu on an H200). The group
// sizes come from device memory, so nothing is read back. Stages: 4 of 48 KB. (Clusters of two blocks taking
// neighbouring row tiles and sharing the weights by multicast were 60% slower: commit 6633ac3.)
constexpr int TOKENS_STAGES = 4;
constexpr unsigned TOKENS_STAGE_BYTES = (128 + 256) * GEMM_BK * 2;

// Unit `unit` of the token-major walk: its group, feature tile and rows.
__device__ __forceinline__ void tokens_locate(const int* __restrict__ offsets, int groups, int featureTiles, int unit, int& group,
    int& featureTile, int& rowBegin, int& rowEnd)
{
    for (int g = 0; g < groups; g++)
    {
        const int begin = offsets[g], end = offsets[g + 1], tiles = (end - begin + 127) / 128;
        if (unit < tiles * featureTiles)
        {
            group = g;
            featureTile = unit / tiles;
            rowBegin = begin + (unit % tiles) * 128;
            rowEnd = end;
            return;
        }
        unit -= tiles * featureTiles;
    }
}

template <bool GATE_UP>
__device__ __forceinline__ void moe_tma_tokens_impl(const TensorMap* weights, const unsigned char* __restrict__ boxed, const TensorMap* rows,
    const int* __restrict__ offsets, int groups, int n, int k, bf16* __restrict__ act, float* __restrict__ y)
{
    extern __shared__ __align__(1024) unsigned char tma_shared[];
    bf16* tileW = (bf16*)tma_shared;                            // [STAGES][256][64], 128-byte swizzled
    bf16* tileA = tileW + TOKENS_STAGES * 256 * GEMM_BK;        // [STAGES][128][64]
    const unsigned full0 = shared_address(tileA + TOKENS_STAGES * 128 * GEMM_BK), empty0 = full0 + 8 * TOKENS_STAGES;

    const int tid = threadIdx.x, role = tid >> 7;
    const int featureTiles = GATE_UP ? n / 128 : n / 256, kTiles = k / GEMM_BK;
    int units = 0;
    for (int g = 0; g < groups; g++) units += (offsets[g + 1] - offsets[g] + 127) / 128 * featureTiles;
    stage_barriers_init(full0, empty0, TOKENS_STAGES);

    if (role == 0)
    {
        // The copying warpgroup gives registers up to the multiplying ones, each of whose threads holds 128 accumulators
        // (168 a thread is the even share at 384 threads). Session 28 found this kernel's wgmma serialised by ptxas (a
        // full wait after each, tensor pipe 62% busy); this, the dead warpgroup's loop of its own and
        // wgmma_fence_operands after the last wait ended that (tools/gpu/sass_wgmma.py checks the SASS).
        registers_release<40>();
        if (tid == 0)
        {
            int stage = 0;
            unsigned phase = 0;
            for (int unit = blockIdx.x; unit < units; unit += gridDim.x)
            {
                int group = 0, featureTile = 0, rowBegin = 0, rowEnd = 0;
                tokens_locate(offsets, groups, featureTiles, unit, group, featureTile, rowBegin, rowEnd);
                // Gate-up: the 128 features' gate rows, then their up rows; down: 256 consecutive rows.
                const int firstRow = GATE_UP ? group * 2 * n + featureTile * 128 : group * n + featureTile * 256;
                const int secondRow = GATE_UP ? firstRow + n : firstRow + 128;
                for (int kt = 0; kt < kTiles; kt++)
                {
                    barrier_wait(empty0 + 8 * stage, phase ^ 1);
                    const unsigned full = full0 + 8 * stage, sw = shared_address(tileW + stage * 256 * GEMM_BK);
                    barrier_expect(full, TOKENS_STAGE_BYTES);
                    if (boxed != nullptr)
                    {
                        bulk_load(sw, boxed_tile(boxed, firstRow, kTiles, kt), 16384, full);
                        bulk_load(sw + 16384, boxed_tile(boxed, secondRow, kTiles, kt), 16384, full);
                    }
                    else
                    {
                        tma_load(sw, weights, kt * GEMM_BK, firstRow, full);
                        tma_load(sw + 16384, weights, kt * GEMM_BK, secondRow, full);
                    }
                    tma_load(shared_address(tileA + stage * 128 * GEMM_BK), rows, kt * GEMM_BK, rowBegin, full);
                    if (++stage == TOKENS_STAGES) { stage = 0; phase ^= 1; }
                }
            }
        }
        return;
    }

    registers_claim<232>();
    const int half = role - 1, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, q = lane & 3;
    int stage = 0;
    unsigned phase = 0;
    float d[128];
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x)
    {
        int group = 0, featureTile = 0, rowBegin = 0, rowEnd = 0;
        tokens_locate(offsets, groups, featureTiles, unit, group, featureTile, rowBegin, rowEnd);
        if (rowBegin + 64 * half >= rowEnd)
        {
            // This warpgroup's 64 rows hold none of the group's (the tile's last rows): it only hands the stages back.
            // (A loop of its own, so that no wgmma sits under a branch inside the multiplying loop.)
            for (int kt = 0; kt < kTiles; kt++)
            {
                barrier_wait(full0 + 8 * stage, phase);
                if (lane == 0) barrier_arrive(empty0 + 8 * stage);
                if (++stage == TOKENS_STAGES) { stage = 0; phase ^= 1; }
            }
            continue;
        }
#pragma unroll
        for (int i = 0; i < 128; i++) d[i] = 0.f;
        int previous = -1;
        for (int kt = 0; kt < kTiles; kt++)
        {
            barrier_wait(full0 + 8 * stage, phase);
            const unsigned long long da = wgmma_descriptor(tileA + stage * 128 * GEMM_BK + half * 64 * GEMM_BK);
            const unsigned long long dw = wgmma_descriptor(tileW + stage * 256 * GEMM_BK);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < GEMM_BK / 16; kk++) wgmma_m64n256k16(d, da + 2 * kk, dw + 2 * kk, 1);
            wgmma_commit();
            wgmma_wait<1>();  // the products of the previous stage are done: hand it back
            if (previous >= 0 && lane == 0) barrier_arrive(empty0 + 8 * previous);
            previous = stage;
            if (++stage == TOKENS_STAGES) { stage = 0; phase ^= 1; }
        }
        wgmma_wait<0>();
        wgmma_fence_operands<128>(d);
        if (previous >= 0 && lane == 0) barrier_arrive(empty0 + 8 * previous);

        // Accumulator r: group row 16·warp + g + 8·((r >> 1) & 1) of the warpgroup's 64, weight column 8·(r >> 2) + 2q + (r & 1).
#pragma unroll
        for (int h = 0; h < 2; h++)
        {
            const int p = rowBegin + 64 * half + 16 * warp + g + 8 * h;
            if (p >= rowEnd) continue;
            if (GATE_UP)
            {
                bf16* out = act + (long long)p * n + featureTile * 128 + 2 * q;
#pragma unroll
                for (int j = 0; j < 16; j++)
                {
                    const int r = 4 * j + 2 * h;
                    const float a0 = silu(d[r]) * d[r + 64], a1 = silu(d[r + 1]) * d[r + 65];
                    *(unsigned*)(out + 8 * j) = (unsigned)float_to_bf16(a0) | ((unsigned)float_to_bf16(a1) << 16);
                }
            }
            else
            {
                float* out = y + (long long)p * n + featureTile * 256 + 2 * q;
#pragma unroll
                for (int j = 0; j < 32; j++)
                {
                    const int r = 4 * j + 2 * h;
                    *(u32x2*)(out + 8 * j) = u32x2{__float_as_uint(d[r]), __float_as_uint(d[r + 1])};
                }
            }
        }
    }
}

#define MOE_TMA_BODY(N, GATE_UP, WIDE) moe_tma_impl<N, GATE_UP, WIDE>(&weights, boxed, &rows, offsets, groups, n, k, act, y, fitRows, splits, splitStride);
#else
#define MOE_TMA_BODY(N, GATE_UP, WIDE) __trap();
#endif

// moe_tma_gate_up_n<N> (N ≤ 128), moe_tma_down_n<N>, moe_tma_down_wide_n<N> (N ≤ 128, n a multiple of 256): grid: a
// block a multiprocessor (at most the tiles' bound); block: 384; dynamic shared memory: TmaStages · (weight rows + N) ·
// 128 + 16 · TmaStages bytes. fitRows ≠ 0: each tile's products narrowed to its group rows (wgmma_step_live). splits > 1
// (down only): k cut into that many shares of whole k-tiles, each share's sums at y + share · splitStride.
#define MOE_TMA_KERNEL(NAME, N, GATE_UP, WIDE) \
    extern "C" __global__ void __launch_bounds__(384, 1) moe_tma_##NAME##_n##N(const __grid_constant__ TensorMap weights, \
        const unsigned char* __restrict__ boxed, const __grid_constant__ TensorMap rows, const int* __restrict__ offsets, int groups, int n, int k, bf16* __restrict__ act, \
        float* __restrict__ y, int fitRows, int splits, long long splitStride) { kernel_prologue(); MOE_TMA_BODY(N, GATE_UP, WIDE) }

MOE_TMA_KERNEL(gate_up, 16, true, false) MOE_TMA_KERNEL(gate_up, 32, true, false) MOE_TMA_KERNEL(gate_up, 64, true, false)
MOE_TMA_KERNEL(gate_up, 96, true, false) MOE_TMA_KERNEL(gate_up, 128, true, false)
MOE_TMA_KERNEL(down, 16, false, false) MOE_TMA_KERNEL(down, 32, false, false) MOE_TMA_KERNEL(down, 64, false, false)
MOE_TMA_KERNEL(down, 96, false, false) MOE_TMA_KERNEL(down, 128, false, false) MOE_TMA_KERNEL(down, 256, false, false)
MOE_TMA_KERNEL(down_wide, 32, false, true) MOE_TMA_KERNEL(down_wide, 64, false, true) MOE_TMA_KERNEL(down_wide, 96, false, true)
MOE_TMA_KERNEL(down_wide, 128, false, true)

// moe_tma_tokens_gate_up (n a multiple of 128), moe_tma_tokens_down (n a multiple of 256): grid: a block a multiprocessor
// (at most the tiles' bound); block: 384; dynamic shared memory: TOKENS_STAGES · (TOKENS_STAGE_BYTES + 16) bytes. Weights
// through the map, or the boxed layout where boxed is not null; rows through a map of 128-row boxes.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_TMA_TOKENS_BODY(GATE_UP) moe_tma_tokens_impl<GATE_UP>(&weights, boxed, &rows, offsets, groups, n, k, act, y);
#else
#define MOE_TMA_TOKENS_BODY(GATE_UP) __trap();
#endif
#define MOE_TMA_TOKENS_KERNEL(NAME, GATE_UP) \
    extern "C" __global__ void __launch_bounds__(384, 1) moe_tma_tokens_##NAME(const __grid_constant__ TensorMap weights, \
        const unsigned char* __restrict__ boxed, const __grid_constant__ TensorMap rows, const int* __restrict__ offsets, int groups, int n, \
        int k, bf16* __restrict__ act, float* __restrict__ y) { kernel_prologue(); MOE_TMA_TOKENS_BODY(GATE_UP) }
MOE_TMA_TOKENS_KERNEL(gate_up, true) MOE_TMA_TOKENS_KERNEL(down, false)

// The boxed layout of expert weights, which the moe_tma kernels read by plain bulk copies instead of the tensor map: a
// row-major bf16 [rows, k] matrix (rows a multiple of 128, k of 64) cut into boxes of 128 rows × 64 columns, box (p, kt)
// (rows 128p.., columns 64kt..) as 16 KB at byte (p · k/64 + kt) · 16384, its row r's 16-byte piece j at r · 128 +
// (j ⊕ r mod 8) · 16: the 128-byte swizzle that the tensor map's copies apply on the way in, applied ahead. Grid-stride,
// a thread a 16-byte piece; source and destination must not overlap.
extern "C" __global__ void moe_box_weights(const u32x4* __restrict__ source, u32x4* __restrict__ destination, long long rows, int k)
{
    kernel_prologue();
    const int pieces = k / 8, kTiles = k / 64;
    const long long total = rows * pieces, stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
    {
        const long long row = i / pieces;
        const int c = (int)(i - row * pieces), r = (int)(row & 127), j = c & 7;
        const long long box = (row >> 7) * kTiles + (c >> 3);
        destination[box * 1024 + r * 8 + (j ^ (r & 7))] = source[i];
    }
}
