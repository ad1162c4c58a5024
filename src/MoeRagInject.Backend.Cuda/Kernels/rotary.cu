// Rotate-half RoPE on the q and k heads of each fp32 qkv row at the row's position (inverse frequencies in fp32 as
// transformers computes them), then k and v into the bf16 cache at the row's KV slot (−1: a padding row, nothing written).
// One block per (row, head), one thread per rotated pair; a k head's block also writes that head's k and v.
// Grid: (rows, heads + kvHeads); block: headDim / 2.
extern "C" __global__ void rope_kv_write(float* __restrict__ qkv, bf16* __restrict__ kCache, bf16* __restrict__ vCache,
    const int* __restrict__ positions, const int* __restrict__ kvSlots, int heads, int kvHeads, int headDim, float theta, int qkvWidth)
{
    kernel_prologue();
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const int half = headDim / 2;
    float* v = qkv + (long long)r * qkvWidth + h * headDim;
    if (i < half)
    {
        const float invFreq = 1.f / powf(theta, (2.f * i) / headDim);
        const float angle = (float)positions[r] * invFreq;
        const float c = cosf(angle), s = sinf(angle);
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
    const int slot = kvSlots[r];
    if (h < heads || slot < 0) return;
    __syncthreads();
    const int kvHead = h - heads, kvWidth = kvHeads * headDim;
    const float* vv = v + kvWidth;
    bf16* kOut = kCache + (long long)slot * kvWidth + kvHead * headDim;
    bf16* vOut = vCache + (long long)slot * kvWidth + kvHead * headDim;
    for (int d = i; d < headDim; d += blockDim.x)
    {
        kOut[d] = float_to_bf16(v[d]);
        vOut[d] = float_to_bf16(vv[d]);
    }
}
