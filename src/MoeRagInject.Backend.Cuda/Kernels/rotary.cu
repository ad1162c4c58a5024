// Rotate-half RoPE on the q and k heads of each fp32 qkv row at the row's position (inverse frequencies in fp32 as
// transformers computes them), then k and v into the bf16 cache at the row's KV slot (−1: a padding row, nothing written).
// Grid: rows; block: 128.
extern "C" __global__ void rope_kv_write(float* __restrict__ qkv, bf16* __restrict__ kCache, bf16* __restrict__ vCache,
    const int* __restrict__ positions, const int* __restrict__ kvSlots, int heads, int kvHeads, int headDim, float theta, int qkvWidth)
{
    const int r = blockIdx.x;
    const int half = headDim / 2;
    const float position = (float)positions[r];
    float* row = qkv + (long long)r * qkvWidth;
    const int pairs = (heads + kvHeads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x)
    {
        const int h = p / half, i = p % half;
        const float invFreq = 1.f / powf(theta, (2.f * i) / headDim);
        const float angle = position * invFreq;
        const float c = cosf(angle), s = sinf(angle);
        float* v = row + h * headDim;
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
    __syncthreads();
    const int slot = kvSlots[r];
    if (slot < 0) return;
    const int kvWidth = kvHeads * headDim;
    const float* k = row + heads * headDim;
    const float* vv = k + kvWidth;
    bf16* kOut = kCache + (long long)slot * kvWidth;
    bf16* vOut = vCache + (long long)slot * kvWidth;
    for (int c = threadIdx.x; c < kvWidth; c += blockDim.x)
    {
        kOut[c] = float_to_bf16(k[c]);
        vOut[c] = float_to_bf16(vv[c]);
    }
}
