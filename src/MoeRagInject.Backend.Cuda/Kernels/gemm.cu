// Grouped GEMM on the tensor cores: y[p, n] = Σ_k a[p, k] · W_g[n, k] over the rows p of each group g (the rows routed to
// one expert, or a single group of all rows for a plain linear), bf16 inputs, fp32 accumulation (mma.sync m16n8k16).
// The groups' row ranges are read from device memory (offsets[g] .. offsets[g + 1]), never from the host, so a captured
// graph replays it whatever the routing: the grid holds a fixed upper bound of row tiles, and blocks past the real tiles
// return at once.
//
// Batch invariance: every output is accumulated over k in 64-wide tiles in one fixed order, one mma at a time, and a
// tensor-core product of one row never depends on the other rows of its tile; so a row's result is the same bits whatever
// else is in the batch and whichever tile shape the host picks. --deterministic relies on this; it also splits k for
// narrow outputs (more blocks at small batches), by a count the host derives from the weight's shape alone, the partial
// sums added in split order.
//
// Tiles: BM = WARPS_M · MI · 16 rows by BN = 2 · HALF weight rows by 64 of k, staged through shared memory by cp.async
// (GEMM_STAGES deep, chunks XOR-swizzled so ldmatrix reads are free of bank conflicts); warps WARPS_M × 2. In gate-up mode
// the BN weight rows are HALF gate rows and the matching HALF up rows of an expert's [2I, H] stack, and the epilogue writes
// act = silu(gate) · up as bf16; otherwise it writes fp32.
#define GEMM_BK 64

// Element offset of 16-byte chunk c of row r in a [rows][64] bf16 tile, the chunk index XOR-ed with the row's low bits.
__device__ __forceinline__ int swizzled(int r, int c) { return r * GEMM_BK + ((c ^ (r & 7)) << 3); }

template <int BM>
struct GemmStages { static constexpr int value = BM >= 128 ? 3 : 4; };

// One stage: k tile kt of the block's rows of a and of its weight rows, 16 bytes a copy (see gemm_grouped_impl).
template <int A_LOADS, int B_LOADS, int ROW_STEP, int HALF, bool GATE_UP>
__device__ __forceinline__ void gemm_load_stage(bf16* sa, bf16* sb, const bf16* __restrict__ a, const int (&aOffset)[A_LOADS],
    const bf16* __restrict__ w, const bf16* wTile, int featureBase, int n, int k, int kt, int chunk, int firstRow)
{
    const bool kValid = kt * GEMM_BK + chunk * 8 < k;
    const int kOffset = kValid ? kt * GEMM_BK : 0;
#pragma unroll
    for (int j = 0; j < A_LOADS; j++)
    {
        const bool valid = aOffset[j] >= 0 && kValid;
        copy_async16(shared_address(sa + swizzled(firstRow + j * ROW_STEP, chunk)), a + (valid ? aOffset[j] + kOffset : 0), valid);
    }
#pragma unroll
    for (int j = 0; j < B_LOADS; j++)
    {
        const int r = j * ROW_STEP;  // past firstRow
        const int feature = featureBase + (GATE_UP ? r % HALF : r);
        const bool valid = feature < n && kValid;
        const long long row = GATE_UP && r >= HALF ? (long long)n - HALF + r : r;
        copy_async16(shared_address(sb + swizzled(firstRow + r, chunk)), valid ? wTile + row * k + kOffset : w, valid);
    }
}

// The fragments of one 16-wide step kk of k for a warp: A for each of its 16-row blocks, B for each pair of its 8-column
// tiles in each half, as matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
template <int MI, int NI, int HALF>
__device__ __forceinline__ void gemm_fragments(unsigned (&fa)[MI][4], unsigned (&fb)[2][NI / 2][4], const bf16* sa, const bf16* sb,
    int kk, int lane, int wm, int wn)
{
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
        load_matrix_x4(shared_address(sa + swizzled(wm * MI * 16 + mi * 16 + (lane & 15), kk * 2 + (lane >> 4))), fa[mi]);
    const int m = lane >> 3;
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int np = 0; np < NI / 2; np++)
            load_matrix_x4(shared_address(sb + swizzled(h * HALF + wn * (HALF / 2) + np * 16 + (m >> 1) * 8 + (lane & 7), kk * 2 + (m & 1))), fb[h][np]);
}

template <int MI, int NI>
__device__ __forceinline__ void gemm_products(float (&acc)[MI][2][NI][4], const unsigned (&fa)[MI][4], const unsigned (&fb)[2][NI / 2][4])
{
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int np = 0; np < NI / 2; np++)
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
            {
                mma_16x8x16(acc[mi][h][2 * np], fa[mi], fb[h][np][0], fb[h][np][1]);
                mma_16x8x16(acc[mi][h][2 * np + 1], fa[mi], fb[h][np][2], fb[h][np][3]);
            }
}

template <int WARPS_M, int MI, int HALF, bool GATE_UP>
__device__ __forceinline__ void gemm_grouped_impl(const bf16* __restrict__ a, const bf16* __restrict__ w,
    const int* __restrict__ offsets, const int* __restrict__ sorted, int groups, int rows, int topK, int n, int k,
    long long splitStride, bf16* __restrict__ act, float* __restrict__ y)
{
    constexpr int BM = WARPS_M * MI * 16, BN = 2 * HALF, THREADS = WARPS_M * 64, NI = HALF / 16;
    constexpr int STAGES = GemmStages<BM>::value;
    constexpr int A_LOADS = BM * 8 / THREADS, B_LOADS = BN * 8 / THREADS, ROW_STEP = THREADS / 8;
    static_assert(HALF % ROW_STEP == 0, "a thread's weight rows must not straddle the gate and up halves");
    extern __shared__ __align__(128) unsigned char gemm_shared[];
    bf16* tileA = (bf16*)gemm_shared;               // [STAGES][BM][64]
    bf16* tileB = tileA + STAGES * BM * GEMM_BK;    // [STAGES][BN][64]

    // This block's group and row range: row tiles are numbered group after group.
    int group = -1, rowBegin = 0, rowEnd = 0;
    {
        int tile = blockIdx.x;
        if (offsets == nullptr)
        {
            if (tile * BM < rows) { group = 0; rowBegin = tile * BM; rowEnd = rows; }
        }
        else
        {
            for (int g = 0; g < groups; g++)
            {
                const int begin = offsets[g], end = offsets[g + 1], tiles = (end - begin + BM - 1) / BM;
                if (tile < tiles) { group = g; rowBegin = begin + tile * BM; rowEnd = end; break; }
                tile -= tiles;
            }
        }
    }
    if (group < 0) return;

    const int tid = threadIdx.x, chunk = tid & 7, firstRow = tid >> 3;
    // Element offsets of the rows of a this thread copies (gathered through sorted[] when given), −1 past the group's rows;
    // its weight rows are firstRow + j · ROW_STEP of the tile, found from one base pointer (ROW_STEP divides HALF, so
    // whether row j is a gate or an up row is known at compile time). The host keeps rows · k within 32 bits.
    int aOffset[A_LOADS];
#pragma unroll
    for (int j = 0; j < A_LOADS; j++)
    {
        const int p = rowBegin + firstRow + j * ROW_STEP;
        aOffset[j] = p >= rowEnd ? -1 : (sorted != nullptr ? sorted[p] / topK : p) * k + chunk * 8;
    }
    const bf16* wTile = w + (long long)group * (GATE_UP ? 2 : 1) * n * k + ((long long)blockIdx.y * (GATE_UP ? HALF : BN) + firstRow) * k + chunk * 8;
    const int featureBase = blockIdx.y * (GATE_UP ? HALF : BN) + firstRow;

    // Split k (gridDim.z > 1, plain mode only): this block sums its own share of the k tiles into its own fp32 slice of y.
    const int allTiles = (k + GEMM_BK - 1) / GEMM_BK, perSplit = (allTiles + gridDim.z - 1) / gridDim.z;
    const int kBegin = blockIdx.z * perSplit, kTiles = max(0, min(allTiles - kBegin, perSplit));
    y += blockIdx.z * splitStride;
    const int lane = tid & 31, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    float acc[MI][2][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int ni = 0; ni < NI; ni++)
#pragma unroll
                for (int q = 0; q < 4; q++) acc[mi][h][ni][q] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++)
    {
        if (s < kTiles)
            gemm_load_stage<A_LOADS, B_LOADS, ROW_STEP, HALF, GATE_UP>(tileA + s * BM * GEMM_BK, tileB + s * BN * GEMM_BK, a, aOffset, w, wTile,
                featureBase, n, k, kBegin + s, chunk, firstRow);
        copy_async_commit();
    }
    // Fragments double-buffered: the next step's loads are in flight during this step's products.
    unsigned fa0[MI][4], fb0[2][NI / 2][4], fa1[MI][4], fb1[2][NI / 2][4];
    for (int kt = 0; kt < kTiles; kt++)
    {
        copy_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt has landed for every thread, and every warp is done with the stage refilled next
        const int next = kt + STAGES - 1;
        if (next < kTiles)
            gemm_load_stage<A_LOADS, B_LOADS, ROW_STEP, HALF, GATE_UP>(tileA + (next % STAGES) * BM * GEMM_BK, tileB + (next % STAGES) * BN * GEMM_BK,
                a, aOffset, w, wTile, featureBase, n, k, kBegin + next, chunk, firstRow);
        copy_async_commit();

        const bf16* sa = tileA + (kt % STAGES) * BM * GEMM_BK;
        const bf16* sb = tileB + (kt % STAGES) * BN * GEMM_BK;
        gemm_fragments<MI, NI, HALF>(fa0, fb0, sa, sb, 0, lane, wm, wn);
#pragma unroll
        for (int kk = 0; kk < GEMM_BK / 16; kk += 2)
        {
            gemm_fragments<MI, NI, HALF>(fa1, fb1, sa, sb, kk + 1, lane, wm, wn);
            gemm_products<MI, NI>(acc, fa0, fb0);
            if (kk + 2 < GEMM_BK / 16) gemm_fragments<MI, NI, HALF>(fa0, fb0, sa, sb, kk + 2, lane, wm, wn);
            gemm_products<MI, NI>(acc, fa1, fb1);
        }
    }
    copy_async_wait<0>();

    // Accumulator (mi, h, ni, q): row g (q < 2) or g + 8 of the 16, columns 2t and 2t + 1 of the 8.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int half = 0; half < 2; half++)
        {
            const int p = rowBegin + wm * MI * 16 + mi * 16 + g + half * 8;
            if (p >= rowEnd) continue;
#pragma unroll
            for (int ni = 0; ni < NI; ni++)
#pragma unroll
                for (int e = 0; e < 2; e++)
                {
                    const int local = wn * (HALF / 2) + ni * 8 + 2 * t + e;
                    if (GATE_UP)
                    {
                        const int feature = blockIdx.y * HALF + local;
                        if (feature < n)
                            act[(long long)p * n + feature] = float_to_bf16(silu(acc[mi][0][ni][2 * half + e]) * acc[mi][1][ni][2 * half + e]);
                    }
                    else
#pragma unroll
                        for (int h = 0; h < 2; h++)
                        {
                            const int column = blockIdx.y * BN + h * HALF + local;
                            if (column < n) y[(long long)p * n + column] = acc[mi][h][ni][2 * half + e];
                        }
                }
        }
}

// Instantiations, named by warps and tile: gemm_{grouped|gate_up}_{WARPS_M}x{MI}_bn{BN} (grouped: fp32 out; gate_up:
// silu·mul, bf16 out); BM = WARPS_M · MI · 16. Grid: (row tiles, bound included, column tiles); block: WARPS_M · 64;
// dynamic shared memory: stages · (BM + BN) · 128 bytes. Split k: grid z > 1, then gemm_split_sum.
#define GEMM_GROUPED(WM, MI, HALF, BN) \
    extern "C" __global__ void __launch_bounds__(WM * 64) gemm_grouped_##WM##x##MI##_bn##BN(const bf16* __restrict__ a, const bf16* __restrict__ w, \
        const int* __restrict__ offsets, const int* __restrict__ sorted, int groups, int rows, int topK, int n, int k, long long splitStride, \
        float* __restrict__ y) \
    { kernel_prologue(); gemm_grouped_impl<WM, MI, HALF, false>(a, w, offsets, sorted, groups, rows, topK, n, k, splitStride, nullptr, y); } \
    extern "C" __global__ void __launch_bounds__(WM * 64) gemm_gate_up_##WM##x##MI##_bn##BN(const bf16* __restrict__ a, const bf16* __restrict__ w, \
        const int* __restrict__ offsets, const int* __restrict__ sorted, int groups, int rows, int topK, int n, int k, long long splitStride, \
        bf16* __restrict__ act) \
    { kernel_prologue(); gemm_grouped_impl<WM, MI, HALF, true>(a, w, offsets, sorted, groups, rows, topK, n, k, 0, act, nullptr); }
#define GEMM_GROUPED_BN(WM, MI) GEMM_GROUPED(WM, MI, 32, 64) GEMM_GROUPED(WM, MI, 64, 128)
GEMM_GROUPED_BN(1, 1) GEMM_GROUPED_BN(1, 2) GEMM_GROUPED_BN(2, 2) GEMM_GROUPED_BN(4, 2) GEMM_GROUPED_BN(1, 4) GEMM_GROUPED_BN(2, 4)

// y[p] = Σ_z partial[z][p] in z order, for the rows a split GEMM wrote (offsets[groups] of them, or rows when offsets is
// null). Grid: (rows (an upper bound), column blocks); block: 256.
extern "C" __global__ void gemm_split_sum(const float* __restrict__ partial, float* __restrict__ y, const int* __restrict__ offsets,
    int groups, int rows, int n, int splits, long long splitStride)
{
    kernel_prologue();
    const int p = blockIdx.x;
    if (p >= (offsets != nullptr ? offsets[groups] : rows)) return;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < n; c += gridDim.y * blockDim.x)
    {
        float sum = 0.f;
        for (int z = 0; z < splits; z++) sum += partial[z * splitStride + (long long)p * n + c];
        y[(long long)p * n + c] = sum;
    }
}
