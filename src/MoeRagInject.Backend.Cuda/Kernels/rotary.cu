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
// row's KV slot (−1: a padding row, nothing written). One thread per rotated pair (i, i + headDim/2) of a head,
// headsPerBlock heads of one row a block; a k head's thread writes its two rotated k elements and the same two elements of
// v to the cache (no barrier: v is not rotated). Grid: (rows, ceil((heads + kvHeads) / headsPerBlock)); block: at least
// headsPerBlock · headDim / 2.
extern "C" __global__ void rope_kv_write(float* __restrict__ qkv, bf16* __restrict__ kCache, bf16* __restrict__ vCache,
    const int* __restrict__ positions, const int* __restrict__ kvSlots, int heads, int kvHeads, int headDim, float theta, int qkvWidth,
    int headsPerBlock, const float* __restrict__ table, int tableRows)
{
    kernel_prologue();
    const int r = blockIdx.x, half = headDim / 2;
    const int local = threadIdx.x / half, i = threadIdx.x % half, h = blockIdx.y * headsPerBlock + local;
    if (local >= headsPerBlock || h >= heads + kvHeads) return;
    float* v = qkv + (long long)r * qkvWidth + h * headDim;
    const int position = positions[r];
    float c, s;
    if (table != nullptr && position < tableRows)
    {
        const float* cs = table + 2 * ((long long)position * half + i);
        c = cs[0];
        s = cs[1];
    }
    else
        rope_angle(position, i, headDim, theta, c, s);
    const float a = v[i], b = v[i + half];
    const float ra = a * c - b * s, rb = b * c + a * s;
    v[i] = ra;
    v[i + half] = rb;
    const int slot = kvSlots[r];
    if (h < heads || slot < 0) return;
    const int kvHead = h - heads, kvWidth = kvHeads * headDim;
    const float* vv = v + kvWidth;
    bf16* kOut = kCache + (long long)slot * kvWidth + kvHead * headDim;
    bf16* vOut = vCache + (long long)slot * kvWidth + kvHead * headDim;
    kOut[i] = float_to_bf16(ra);
    kOut[i + half] = float_to_bf16(rb);
    vOut[i] = float_to_bf16(vv[i]);
    vOut[i + half] = float_to_bf16(vv[i + half]);
}
