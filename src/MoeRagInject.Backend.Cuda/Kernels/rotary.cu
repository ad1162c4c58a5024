// The rotation of pair i at a position: the inverse frequency in fp32 as transformers computes it, then cos and sin of
// position · frequency.
__device__ __forceinline__ void rope_angle(int position, int i, int headDim, float theta, float& c, float& s)
{
    const float invFreq = 1.f / powf(theta, (2.f * i) / headDim);
    const float angle = (float)position * invFreq;
    c = cosf(angle);
    s = sinf(angle);
}

// (cos, sin) of every position below `positions` and pair i < headDim / 2, as rope_angle computes them (the same bits), so
// that rope_kv_write reads them instead of computing three transcendental functions a pair. Grid: ceil(positions · headDim
// / 2 / 256); block: 256.
extern "C" __global__ void rope_table(float* __restrict__ table, int positions, int headDim, float theta)
{
    kernel_prologue();
    const int half = headDim / 2;
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= (long long)positions * half) return;
    rope_angle((int)(index / half), (int)(index % half), headDim, theta, table[2 * index], table[2 * index + 1]);
}

// Rotate-half RoPE on the q and k heads of each fp32 qkv row at the row's position (rope_angle: from `table`, (cos, sin)
// of [tableRows][headDim / 2], where the table has the position, else computed), then k and v into the bf16 cache at the
// row's KV slot (−1: a padding row, nothing written). One thread per P consecutive rotated pairs (i, i + headDim/2) of a
// head (P = 4: 16-byte loads and stores, where headDim / 2 is a multiple of 4), headsPerBlock heads of one row a block; a
// k head's thread writes its rotated k elements and the same elements of v to the cache (no barrier: v is not rotated).
// Grid: (rows, ceil((heads + kvHeads) / headsPerBlock)); block: at least headsPerBlock · headDim / 2 / P.
template <int P>
__device__ __forceinline__ void rope_kv_write_impl(float* __restrict__ qkv, bf16* __restrict__ kCache, bf16* __restrict__ vCache,
    const int* __restrict__ positions, const int* __restrict__ kvSlots, int heads, int kvHeads, int headDim, float theta, int qkvWidth,
    int headsPerBlock, const float* __restrict__ table, int tableRows)
{
    typedef float Floats[P];
    const int r = blockIdx.x, half = headDim / 2, threadsPerHead = half / P;
    const int local = threadIdx.x / threadsPerHead, i = (threadIdx.x % threadsPerHead) * P, h = blockIdx.y * headsPerBlock + local;
    if (local >= headsPerBlock || h >= heads + kvHeads) return;
    float* v = qkv + (long long)r * qkvWidth + h * headDim;
    const int position = positions[r];
    alignas(16) Floats c, s, a, b;
    if (table != nullptr && position < tableRows)
    {
        alignas(16) Floats cs[2];
        const float* t = table + 2 * ((long long)position * half + i);
        if (P == 4)
        {
            *(f32x4*)&cs[0] = ((const f32x4*)t)[0];
            *(f32x4*)&cs[1] = ((const f32x4*)t)[1];
        }
        else
#pragma unroll
            for (int p = 0; p < P; p++) cs[2 * p / P][2 * p % P] = t[2 * p], cs[(2 * p + 1) / P][(2 * p + 1) % P] = t[2 * p + 1];
#pragma unroll
        for (int p = 0; p < P; p++)
        {
            c[p] = cs[2 * p / P][2 * p % P];
            s[p] = cs[(2 * p + 1) / P][(2 * p + 1) % P];
        }
    }
    else
#pragma unroll
        for (int p = 0; p < P; p++) rope_angle(position, i + p, headDim, theta, c[p], s[p]);
    if (P == 4)
    {
        *(f32x4*)&a = *(const f32x4*)(v + i);
        *(f32x4*)&b = *(const f32x4*)(v + i + half);
    }
    else
#pragma unroll
        for (int p = 0; p < P; p++) a[p] = v[i + p], b[p] = v[i + half + p];
    alignas(16) Floats ra, rb;
#pragma unroll
    for (int p = 0; p < P; p++)
    {
        ra[p] = a[p] * c[p] - b[p] * s[p];
        rb[p] = b[p] * c[p] + a[p] * s[p];
    }
    if (P == 4)
    {
        *(f32x4*)(v + i) = *(const f32x4*)&ra;
        *(f32x4*)(v + i + half) = *(const f32x4*)&rb;
    }
    else
#pragma unroll
        for (int p = 0; p < P; p++) v[i + p] = ra[p], v[i + half + p] = rb[p];
    const int slot = kvSlots[r];
    if (h < heads || slot < 0) return;
    const int kvHead = h - heads, kvWidth = kvHeads * headDim;
    const float* vv = v + kvWidth;
    bf16* kOut = kCache + (long long)slot * kvWidth + kvHead * headDim;
    bf16* vOut = vCache + (long long)slot * kvWidth + kvHead * headDim;
    if (P == 4)
    {
        *(u32x2*)(kOut + i) = float_to_bf16x4(*(const f32x4*)&ra);
        *(u32x2*)(kOut + i + half) = float_to_bf16x4(*(const f32x4*)&rb);
        *(u32x2*)(vOut + i) = float_to_bf16x4(*(const f32x4*)(vv + i));
        *(u32x2*)(vOut + i + half) = float_to_bf16x4(*(const f32x4*)(vv + i + half));
    }
    else
#pragma unroll
        for (int p = 0; p < P; p++)
        {
            kOut[i + p] = float_to_bf16(ra[p]);
            kOut[i + half + p] = float_to_bf16(rb[p]);
            vOut[i + p] = float_to_bf16(vv[i + p]);
            vOut[i + half + p] = float_to_bf16(vv[i + half + p]);
        }
}

#define ROPE_KV_WRITE_KERNEL(NAME, P) \
    extern "C" __global__ void NAME(float* __restrict__ qkv, bf16* __restrict__ kCache, bf16* __restrict__ vCache, \
        const int* __restrict__ positions, const int* __restrict__ kvSlots, int heads, int kvHeads, int headDim, float theta, \
        int qkvWidth, int headsPerBlock, const float* __restrict__ table, int tableRows) \
    { kernel_prologue(); \
        rope_kv_write_impl<P>(qkv, kCache, vCache, positions, kvSlots, heads, kvHeads, headDim, theta, qkvWidth, headsPerBlock, table, \
            tableRows); \
    }
ROPE_KV_WRITE_KERNEL(rope_kv_write, 1)
ROPE_KV_WRITE_KERNEL(rope_kv_write_x4, 4)
