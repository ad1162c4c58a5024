// Rotate-half RoPE on the q and k heads of each fp32 qkv row at the row's position (inverse frequencies in fp32 as
// transformers computes them), then k and v into the bf16 cache at the row's KV slot (−1: a padding row, nothing written).
// One thread per rotated pair (i, i + headDim/2) of a head, headsPerBlock heads of one row a block; a k head's thread
// writes its two rotated k elements and the same two elements of v to the cache (no barrier: v is not rotated).
// Grid: (rows, ceil((heads + kvHeads) / headsPerBlock)); block: at least headsPerBlock · headDim / 2.
extern "C" __global__ void rope_kv_write(float* __restrict__ qkv, bf16* __restrict__ kCache, bf16* __restrict__ vCache,
    const int* __restrict__ positions, const int* __restrict__ kvSlots, int heads, int kvHeads, int headDim, float theta, int qkvWidth,
    int headsPerBlock)
{
    kernel_prologue();
    const int r = blockIdx.x, half = headDim / 2;
    const int local = threadIdx.x / half, i = threadIdx.x % half, h = blockIdx.y * headsPerBlock + local;
    if (local >= headsPerBlock || h >= heads + kvHeads) return;
    float* v = qkv + (long long)r * qkvWidth + h * headDim;
    const float invFreq = 1.f / powf(theta, (2.f * i) / headDim);
    const float angle = (float)positions[r] * invFreq;
    const float c = cosf(angle), s = sinf(angle);
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
