// The router probe (--trigger-signal router-probe), run after a layer's route kernel on the same input: each row's softmax
// over all experts, computed as route computes it (the same reduction order, so the same probabilities), is kept at
// (row, layer) for eager diagnostics, and its dot product with the probe's weights of this layer is added to the row's
// probe sum (set at layer 0). At the last layer each sequence's last row writes its sum to the step's output. Everything it
// reads and writes is device memory at fixed addresses (the weights too), so a captured graph replays it as it is.
#define PROBE_MAX_EXPERTS 64

// Grid: rows; block: 256. probe: fp32 [layers, experts]; rowProbs: [rows, layers, experts]; rowSums: [rows];
// outSums: [sequences]. Padding rows (slot −1) get probabilities and sums of 0.
extern "C" __global__ void router_probe(const bf16* __restrict__ x, const bf16* __restrict__ w, int hidden, int experts,
    const float* __restrict__ probe, const int* __restrict__ rowSequence, const int* __restrict__ seqSlot,
    const int* __restrict__ queryStart, float* __restrict__ rowProbs, float* __restrict__ rowSums, float* __restrict__ outSums,
    int layer, int layers)
{
    __shared__ float logits[PROBE_MAX_EXPERTS];
    const int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const u32x4* xRow = (const u32x4*)(x + (long long)r * hidden);
    const int chunks = hidden / 8;
    for (int e = warp; e < experts; e += warps)
    {
        const u32x4* wRow = (const u32x4*)(w + (long long)e * hidden);
        float s = 0.f;
        for (int c = lane; c < chunks; c += 32) s += dot8(wRow[c], xRow[c]);
        s = warp_sum(s);
        if (lane == 0) logits[e] = s;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    const int sequence = rowSequence[r];
    float* probs = rowProbs + ((long long)r * layers + layer) * experts;
    const float* weights = probe + (long long)layer * experts;
    float z = 0.f;
    if (seqSlot[sequence] < 0)
    {
        for (int e = 0; e < experts; e++) probs[e] = 0.f;
    }
    else
    {
        float max = NEG_INF;
        for (int e = 0; e < experts; e++) max = fmaxf(max, logits[e]);
        float sum = 0.f;
        for (int e = 0; e < experts; e++)
        {
            logits[e] = expf(logits[e] - max);
            sum += logits[e];
        }
        for (int e = 0; e < experts; e++)
        {
            const float p = logits[e] / sum;
            probs[e] = p;
            z += weights[e] * p;
        }
    }
    const float total = layer == 0 ? z : rowSums[r] + z;
    rowSums[r] = total;
    if (layer == layers - 1 && queryStart[sequence + 1] - 1 == r) outSums[sequence] = total;
}
