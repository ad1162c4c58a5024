// y[t, n] = Σ_k x[t, k] · W[n, k] for a few rows: one warp per output feature reads its weight row once (16-byte loads,
// lanes striding over the row) and dots it with every row of x. Memory-bound on the weights, so it reads them at close to
// the card's bandwidth when few rows share them; each output is one fixed-order reduction, whatever the number of rows
// (--deterministic nonetheless takes the wgmma kernel, whose sums are fixed in the same way at every batch size and which
// many rows share better). Instantiated for GEMV_T rows per pass
// (1, 2, 4, 8: fewer accumulators, more warps resident). Grid: (ceil(N / 8), ceil(rows / GEMV_T)); block: 256.
template <int GEMV_T>
__device__ __forceinline__ void linear_rows_impl(const bf16* __restrict__ x, const bf16* __restrict__ w,
    float* __restrict__ y, int rows, int n, int k)
{
    const int lane = threadIdx.x & 31;
    const int feature = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int first = blockIdx.y * GEMV_T;
    if (feature >= n) return;
    const int count = min(GEMV_T, rows - first);
    const u32x4* wRow = (const u32x4*)(w + (long long)feature * k);
    const int chunks = k / 8;
    float acc[GEMV_T];
#pragma unroll
    for (int t = 0; t < GEMV_T; t++) acc[t] = 0.f;
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32)
    {
        const u32x4 wv = wRow[c];
#pragma unroll
        for (int t = 0; t < GEMV_T; t++)
            if (t < count) acc[t] += dot8(wv, ((const u32x4*)(x + (long long)(first + t) * k))[c]);
    }
#pragma unroll
    for (int t = 0; t < GEMV_T; t++)
    {
        const float total = warp_sum(acc[t]);
        if (lane == 0 && t < count) y[(long long)(first + t) * n + feature] = total;
    }
}

#define LINEAR_ROWS(T) \
    extern "C" __global__ void __launch_bounds__(256) linear_rows_t##T(const bf16* __restrict__ x, const bf16* __restrict__ w, \
        float* __restrict__ y, int rows, int n, int k) { kernel_prologue(); linear_rows_impl<T>(x, w, y, rows, n, k); }
LINEAR_ROWS(1) LINEAR_ROWS(2) LINEAR_ROWS(4) LINEAR_ROWS(8)
