// The router probe (--trigger-signal router-probe), run after a layer's route kernel on the same input: each row's softmax
// over all experts, computed as route computes it (router_logits of moe.cu, so the same probabilities), is kept at
// (row, layer) for eager diagnostics, and its dot product with the probe's weights of this layer is added to the row's
// probe sum (set at layer 0). At the last layer each sequence's last row writes its sum to the step's output. Everything it
// reads and writes is device memory at fixed addresses (the weights too), so a captured graph replays it as it is.
#define PROBE_MAX_EXPERTS 64

// Grid: rows; block: the norms' (up to 1024). probe: fp32 [layers, experts]; rowProbs: [rows, layers, experts]; rowSums:
// [rows]; outSums: [sequences]. Padding rows (slot −1) get probabilities and sums of 0.
extern "C" __global__ void __launch_bounds__(1024) router_probe(const bf16* __restrict__ x, const bf16* __restrict__ w, int hidden, int experts,
    const float* __restrict__ probe, const int* __restrict__ rowSequence, const int* __restrict__ seqSlot,
    const int* __restrict__ queryStart, float* __restrict__ rowProbs, float* __restrict__ rowSums, float* __restrict__ outSums,
    int layer, int layers)
{
    kernel_prologue();
    __shared__ float partial[32 * PROBE_MAX_EXPERTS], logits[PROBE_MAX_EXPERTS];
    const int r = blockIdx.x;
    f32x4 held[ROW_HELD];
    hold_bf16_row(x + (long long)r * hidden, hidden, held);
    router_logits(held, w, hidden, experts, partial, logits);  // moe.cu: the route kernel's sum
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
        router_softmax(logits, experts);  // moe.cu: route's probabilities
        for (int e = 0; e < experts; e++)
        {
            probs[e] = logits[e];
            z += weights[e] * logits[e];
        }
    }
    const float total = layer == 0 ? z : rowSums[r] + z;
    rowSums[r] = total;
    if (layer == layers - 1 && queryStart[sequence + 1] - 1 == r) outSums[sequence] = total;
}
