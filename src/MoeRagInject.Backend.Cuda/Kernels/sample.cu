// One token per sequence from its logits row, as the host sampler does (sglang's order): repetition, frequency and presence
// penalties, the min_new_tokens mask, then greedy (temperature 0 or top-k 1) or temperature with top-k, top-p and min-p
// cuts, and a draw with the sequence's own uniform. The kept tokens are walked in id order for the draw (the host walks them
// by probability; both draw from the same distribution). The log-probability and the entropy are those of the raw logits.
// Non-finite logits or router entropies are reported, not sampled. Grid: sequences; block: 1024.
#define SAMPLE_THREADS 1024
#define MAX_SUPPRESSED 16
#define FLAG_SUPPRESS 1
#define FLAG_LOGPROB 2
#define FLAG_ENTROPY 4
#define FLAG_FAIL 8
#define FLAG_SAMPLE 16
#define STATUS_OK 0
#define STATUS_NO_TOKEN 1
#define STATUS_NON_FINITE 2
#define STATUS_FAILED 3

// Per-slot sampling parameters, 8 floats: temperature, top-p, top-k, min-p, repetition, frequency, presence, suppressed count.
struct SlotParams { float temperature, topP, topK, minP, repetition, frequency, presence, suppressedCount; };

__device__ __forceinline__ float penalised(const float* __restrict__ raw, int v, const SlotParams& p, const int* __restrict__ counts,
    const unsigned char* __restrict__ inPrompt, bool penalties)
{
    float x = raw[v];
    if (!penalties) return x;
    const int c = counts[v];
    if (p.repetition != 1.f && (c > 0 || inPrompt[v])) x = x > 0.f ? x / p.repetition : x * p.repetition;
    if (c > 0) x -= p.frequency * c + p.presence;
    return x;
}

// An order-preserving unsigned key of a float (NaN excluded): larger floats give larger keys.
__device__ __forceinline__ unsigned float_key(float f)
{
    const unsigned b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample(const float* __restrict__ logits, float* __restrict__ work, int vocab,
    const int* __restrict__ queryStart, const int* __restrict__ seqSlot, const int* __restrict__ seqFlags, const float* __restrict__ uniforms,
    const float* __restrict__ slotParams, const int* __restrict__ suppressed, const int* __restrict__ counts,
    const unsigned char* __restrict__ promptMask, const float* __restrict__ rowEntropies, int layers,
    int* __restrict__ outTokens, float* __restrict__ outLogprobs, float* __restrict__ outEntropy, float* __restrict__ outRouter,
    int* __restrict__ outStatus)
{
    kernel_prologue();
    __shared__ float scratch[32];
    __shared__ float bestValue[32];
    __shared__ int bestIndex[32];
    __shared__ float prefix[SAMPLE_THREADS];
    __shared__ int bad;
    const int i = blockIdx.x, t = threadIdx.x;
    const int flags = seqFlags[i];
    const int lastRow = queryStart[i + 1] - 1;
    if (t == 0) bad = 0;
    __syncthreads();
    for (int l = t; l < layers; l += blockDim.x)
    {
        const float h = rowEntropies[(long long)lastRow * layers + l];
        outRouter[(long long)i * layers + l] = h;
        if (!isfinite(h)) bad = 1;
    }
    if (!(flags & FLAG_SAMPLE))
    {
        if (t == 0)
        {
            outTokens[i] = -1;
            outStatus[i] = STATUS_NO_TOKEN;
        }
        return;
    }
    const float* raw = logits + (long long)i * vocab;
    float localMax = NEG_INF;
    for (int v = t; v < vocab; v += blockDim.x)
    {
        const float x = raw[v];
        if (isnan(x) || x == POS_INF) bad = 1;
        localMax = fmaxf(localMax, x);
    }
    __syncthreads();
    if (bad)
    {
        if (t == 0)
        {
            outTokens[i] = -1;
            outStatus[i] = STATUS_NON_FINITE;
        }
        return;
    }
    const float rawMax = block_max(localMax, scratch);
    float z = 0.f, weighted = 0.f;
    for (int v = t; v < vocab; v += blockDim.x)
    {
        const float d = raw[v] - rawMax;
        const float e = expf(d);
        z += e;
        weighted = fmaf(e, d, weighted);
    }
    z = block_sum(z, scratch);
    weighted = block_sum(weighted, scratch);
    const float logZ = logf(z);
    if (flags & FLAG_FAIL)
    {
        if (t == 0)
        {
            outTokens[i] = -1;
            outStatus[i] = STATUS_FAILED;
        }
        return;
    }

    const int slot = seqSlot[i];
    const SlotParams p = ((const SlotParams*)slotParams)[slot];
    const bool penalties = p.repetition != 1.f || p.frequency != 0.f || p.presence != 0.f;
    const int* slotCounts = counts + (long long)slot * vocab;
    const unsigned char* slotPrompt = promptMask + (long long)slot * vocab;
    const bool greedy = p.temperature == 0.f || p.topK == 1.f;
    const float invTemperature = greedy ? 1.f : 1.f / p.temperature;
    float* s = work + (long long)i * vocab;
    for (int v = t; v < vocab; v += blockDim.x) s[v] = penalised(raw, v, p, slotCounts, slotPrompt, penalties) * invTemperature;
    __syncthreads();
    if (flags & FLAG_SUPPRESS)
        for (int j = t; j < (int)p.suppressedCount && j < MAX_SUPPRESSED; j += blockDim.x)
        {
            const int id = suppressed[slot * MAX_SUPPRESSED + j];
            if (id >= 0 && id < vocab) s[id] = NEG_INF;
        }
    __syncthreads();

    int token = 0;
    if (greedy)
    {
        // The first index of the largest value, as the host's ArgMax.
        float value = NEG_INF;
        int index = vocab;
        for (int v = t; v < vocab; v += blockDim.x)
            if (s[v] > value) { value = s[v]; index = v; }
        for (int o = 16; o > 0; o >>= 1)
        {
            const float ov = __shfl_xor_sync(0xffffffffu, value, o);
            const int oi = __shfl_xor_sync(0xffffffffu, index, o);
            if (ov > value || (ov == value && oi < index)) { value = ov; index = oi; }
        }
        if ((t & 31) == 0) { bestValue[t >> 5] = value; bestIndex[t >> 5] = index; }
        __syncthreads();
        if (t == 0)
        {
            float bv = bestValue[0];
            int bi = bestIndex[0];
            for (int w = 1; w < (int)(blockDim.x >> 5); w++)
                if (bestValue[w] > bv || (bestValue[w] == bv && bestIndex[w] < bi)) { bv = bestValue[w]; bi = bestIndex[w]; }
            bestIndex[0] = bi < vocab ? bi : 0;
        }
        __syncthreads();
        token = bestIndex[0];
    }
    else
    {
        float m = NEG_INF;
        for (int v = t; v < vocab; v += blockDim.x) m = fmaxf(m, s[v]);
        const float sMax = block_max(m, scratch);
        // Unnormalised probabilities q_v = exp(s_v − max) ∈ (0, 1]; the largest is 1.
        float total = 0.f;
        for (int v = t; v < vocab; v += blockDim.x) total += expf(s[v] - sMax);
        total = block_sum(total, scratch);
        // Threshold keys, each found by a binary search on the order-preserving key of s.
        unsigned threshold = 0u;
        const int topK = (int)p.topK;
        if (topK > 0 && topK < vocab)
        {
            unsigned lo = 0u, hi = 0xffffffffu;  // the largest key with at least topK values at or above it
            while (lo < hi)
            {
                const unsigned mid = lo + (hi - lo) / 2u + ((hi - lo) & 1u);  // the upper middle, without overflow
                float n = 0.f;
                for (int v = t; v < vocab; v += blockDim.x) n += float_key(s[v]) >= mid ? 1.f : 0.f;
                if (block_sum(n, scratch) >= (float)topK) lo = mid; else hi = mid - 1u;
            }
            threshold = lo;
        }
        if (p.topP < 1.f)
        {
            unsigned lo = threshold, hi = 0xffffffffu;  // the largest key whose mass at or above it reaches top-p
            while (lo < hi)
            {
                const unsigned mid = lo + (hi - lo) / 2u + ((hi - lo) & 1u);  // the upper middle, without overflow
                float mass = 0.f;
                for (int v = t; v < vocab; v += blockDim.x) mass += float_key(s[v]) >= mid ? expf(s[v] - sMax) : 0.f;
                if (block_sum(mass, scratch) >= p.topP * total) lo = mid; else hi = mid - 1u;
            }
            threshold = lo;
        }
        if (p.minP > 0.f)
        {
            // q_v ≥ minP · q_max with q_max = 1: s_v ≥ max + ln(minP).
            const unsigned minKey = float_key(sMax + logf(p.minP));
            if (minKey > threshold) threshold = minKey;
        }
        // The draw, walking the kept tokens in id order: each thread sums a contiguous range, a block scan finds the range.
        const int per = (vocab + blockDim.x - 1) / blockDim.x;
        const int begin = min(vocab, t * per), end = min(vocab, begin + per);
        float mine = 0.f;
        for (int v = begin; v < end; v++) mine += float_key(s[v]) >= threshold ? expf(s[v] - sMax) : 0.f;
        prefix[t] = mine;
        __syncthreads();
        if (t == 0)
        {
            float running = 0.f;
            for (int j = 0; j < (int)blockDim.x; j++)
            {
                const float here = prefix[j];
                prefix[j] = running;
                running += here;
            }
            scratch[0] = running;
        }
        __syncthreads();
        const float kept = scratch[0];
        const float draw = uniforms[i] * kept;
        if (t == 0) bestIndex[0] = 0x7fffffff;
        __syncthreads();
        if (draw >= prefix[t] && (draw < prefix[t] + mine || t == (int)blockDim.x - 1))
        {
            float running = prefix[t];
            int chosen = -1;
            for (int v = begin; v < end; v++)
            {
                if (float_key(s[v]) < threshold) continue;
                chosen = v;
                running += expf(s[v] - sMax);
                if (draw < running) break;
            }
            if (chosen >= 0) atomicMin(&bestIndex[0], chosen);
        }
        __syncthreads();
        token = bestIndex[0];
        if (token == 0x7fffffff)
        {
            // Rounding left the draw past every range: the last kept token.
            if (t == 0) bestIndex[1] = -1;
            __syncthreads();
            for (int v = t; v < vocab; v += blockDim.x)
                if (float_key(s[v]) >= threshold) atomicMax(&bestIndex[1], v);
            __syncthreads();
            token = bestIndex[1];
        }
    }
    if (t == 0)
    {
        outTokens[i] = token;
        outLogprobs[i] = (flags & FLAG_LOGPROB) ? raw[token] - rawMax - logZ : 0.f;
        outEntropy[i] = (flags & FLAG_ENTROPY) ? logZ - weighted / z : 0.f;
        outStatus[i] = STATUS_OK;
    }
}
