// The MoE block: the router, then the experts by a path that the backend picks by the number of rows:
//  - small (one row): warp-per-feature kernels that read each routed expert's weights once, expert ids read from device
//    memory (no host involvement, so a captured graph replays them whatever the routing);
//  - tensor / wgmma (up to 128 rows): rows sorted by expert on the device (moe_align), then the grouped tensor-core
//    GEMMs of gemm.cu (mma.sync) or gemm_wgmma.cu (Hopper), which read the group sizes from device memory
//    (graph-capturable), and moe_combine_grouped;
//  - dense (kept to measure against): all experts on all rows with strided-batched cuBLAS, then each row sums its own;
//  - cuBLAS per expert (prefill chunks, eager): the same sort, the group sizes read back, one GEMM pair per expert.
#define ROUTER_MAX_EXPERTS 64
#define ROUTER_MAX_TOPK 8
#define MOE_MAX_SLOTS 8192

// The (row, k) slots routed to expert e, in slot order, into routed[] (shared); their number into *count. Warp 0 scans
// 32 slots at a time with a ballot, so the order is stable and the scan is short.
__device__ __forceinline__ void collect_routed(const int* __restrict__ topIds, int slots, int e, int* routed, int* count)
{
    if (threadIdx.x < 32)
    {
        const int lane = threadIdx.x;
        int n = 0;
        for (int base = 0; base < slots; base += 32)
        {
            const int s = base + lane;
            const bool mine = s < slots && topIds[s] == e;
            const unsigned mask = __ballot_sync(0xffffffffu, mine);
            if (mine) routed[n + __popc(mask & ((1u << lane) - 1u))] = s;
            n += __popc(mask);
        }
        if (lane == 0) *count = n;
    }
    __syncthreads();
}

// A bf16 row into the block's registers as ROW_HELD chunks a thread (zeros past the row).
__device__ __forceinline__ void hold_bf16_row(const bf16* __restrict__ x, int hidden, f32x4 (&held)[ROW_HELD])
{
    const u32x2* row = (const u32x2*)x;
#pragma unroll
    for (int j = 0; j < ROW_HELD; j++)
    {
        const int c = threadIdx.x + j * blockDim.x;
        held[j] = c < hidden / 4 ? bf16x4_to_float(row[c]) : f32x4{0.f, 0.f, 0.f, 0.f};
    }
}

// logits[e] = W_e · x in fp32 for the row the block holds (ROW_HELD): each thread sums its chunks' products in chunk
// order, each warp adds its lanes' sums (warp_sum), then the warps' sums are added in warp order. Every load of an expert's
// weights is issued before its first product. route, add_rms_norm_route and router_probe all hold and sum a row this
// way, so with the same block size they agree bit for bit; under --deterministic the block size is fixed, so each row's
// logits are the same whatever the batch. partial: 32 · experts floats of shared memory.
__device__ __forceinline__ void router_logits(const f32x4 (&x)[ROW_HELD], const bf16* __restrict__ w, int hidden, int experts,
    float* partial, float* logits)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll 2
    for (int e = 0; e < experts; e++)
    {
        const u32x2* wRow = (const u32x2*)(w + (long long)e * hidden);
        u32x2 wv[ROW_HELD];
#pragma unroll
        for (int j = 0; j < ROW_HELD; j++)
        {
            const int c = threadIdx.x + j * blockDim.x;
            wv[j] = c < hidden / 4 ? wRow[c] : u32x2{0u, 0u};
        }
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < ROW_HELD; j++)
        {
            const f32x4 v = bf16x4_to_float(wv[j]);
            s = fmaf(v.x, x[j].x, s);
            s = fmaf(v.y, x[j].y, s);
            s = fmaf(v.z, x[j].z, s);
            s = fmaf(v.w, x[j].w, s);
        }
        s = warp_sum(s);
        if (lane == 0) partial[warp * experts + e] = s;
    }
    __syncthreads();
    if (threadIdx.x < experts)
    {
        float total = 0.f;
        for (int i = 0; i < warps; i++) total += partial[i * experts + threadIdx.x];
        logits[threadIdx.x] = total;
    }
    __syncthreads();
}

// logits[e] ← softmax over the experts in fp32 (one thread): the probabilities route and router_probe both use.
__device__ __forceinline__ void router_softmax(float* logits, int experts)
{
    float max = NEG_INF;
    for (int e = 0; e < experts; e++) max = fmaxf(max, logits[e]);
    float sum = 0.f;
    for (int e = 0; e < experts; e++)
    {
        logits[e] = expf(logits[e] - max);
        sum += logits[e];
    }
    for (int e = 0; e < experts; e++) logits[e] /= sum;
}

// The router's decision for row r from its logits (thread 0 only): softmax over all experts, its entropy (nats) at
// (row, layer), the top-k by probability (ties to the lower expert id) renormalised over the k. Padding rows (slot −1)
// get expert −1, weight 0 and entropy 0.
__device__ __forceinline__ void route_row(float* logits, int r, int experts, int topK, bool padding, int* __restrict__ topIds,
    float* __restrict__ topWeights, float* __restrict__ entropies, int layer, int layers)
{
    int* ids = topIds + (long long)r * topK;
    float* weights = topWeights + (long long)r * topK;
    if (padding)
    {
        for (int k = 0; k < topK; k++)
        {
            ids[k] = -1;
            weights[k] = 0.f;
        }
        entropies[(long long)r * layers + layer] = 0.f;
        return;
    }
    router_softmax(logits, experts);
    float entropy = 0.f;
    for (int e = 0; e < experts; e++)
        if (logits[e] > 0.f) entropy -= logits[e] * logf(logits[e]);
    entropies[(long long)r * layers + layer] = entropy;
    unsigned long long chosen = 0;
    float chosenSum = 0.f;
    for (int k = 0; k < topK; k++)
    {
        int best = -1;
        for (int e = 0; e < experts; e++)
            if (!((chosen >> e) & 1ull) && (best < 0 || logits[e] > logits[best])) best = e;
        chosen |= 1ull << best;
        ids[k] = best;
        weights[k] = logits[best];
        chosenSum += logits[best];
    }
    for (int k = 0; k < topK; k++) weights[k] /= chosenSum;
}

// Router: route_row of router_logits for every row. Grid: rows; block: the norms' (up to 1024).
extern "C" __global__ void __launch_bounds__(1024) route(const bf16* __restrict__ x, const bf16* __restrict__ w, int hidden,
    int experts, int topK, const int* __restrict__ rowSequence, const int* __restrict__ seqSlot, int* __restrict__ topIds,
    float* __restrict__ topWeights, float* __restrict__ entropies, int layer, int layers)
{
    kernel_prologue();
    __shared__ float partial[32 * ROUTER_MAX_EXPERTS], logits[ROUTER_MAX_EXPERTS];
    const int r = blockIdx.x;
    f32x4 held[ROW_HELD];
    hold_bf16_row(x + (long long)r * hidden, hidden, held);
    router_logits(held, w, hidden, experts, partial, logits);
    if (threadIdx.x == 0)
        route_row(logits, r, experts, topK, seqSlot[rowSequence[r]] < 0, topIds, topWeights, entropies, layer, layers);
}

// Small path, gate and up: for expert blockIdx.x and 8 intermediate features (a warp each), act[slot, n] =
// silu(gate_n · x) · (up_n · x) for every (row, k) slot routed to the expert, MOE_T slots per pass over the weights
// (instantiated for 1, 2, 4, 8, 16: the host picks the smallest that holds every slot). Weights [E, 2I, H]: gate rows,
// then up rows, row-major or (boxed ≠ 0) boxed, as row_walk reads them (so too the down weights and the one-row
// kernels'). Grid: (E, ceil(I / 8)); block: 256.
template <int MOE_T>
__device__ __forceinline__ void moe_small_gate_up_impl(const bf16* __restrict__ x, const bf16* __restrict__ gateUp,
    const int* __restrict__ topIds, bf16* __restrict__ act, int slots, int topK, int hidden, int intermediate, int boxed)
{
    __shared__ int routed[MOE_MAX_SLOTS];
    __shared__ int count;
    const int e = blockIdx.x, lane = threadIdx.x & 31;
    collect_routed(topIds, slots, e, routed, &count);
    const int feature = blockIdx.y * 8 + (threadIdx.x >> 5);
    if (count == 0 || feature >= intermediate) return;
    const RowWalk gw = row_walk((long long)e * 2 * intermediate + feature, hidden, lane, boxed);
    const RowWalk uw = row_walk((long long)e * 2 * intermediate + intermediate + feature, hidden, lane, boxed);
    const int chunks = hidden / 8;
    for (int first = 0; first < count; first += MOE_T)
    {
        const int n = min(MOE_T, count - first);
        const u32x4* rows[MOE_T];
#pragma unroll
        for (int t = 0; t < MOE_T; t++) rows[t] = (const u32x4*)(x + (long long)(routed[first + min(t, n - 1)] / topK) * hidden);
        float g[MOE_T], u[MOE_T];
#pragma unroll
        for (int t = 0; t < MOE_T; t++) g[t] = u[t] = 0.f;
        const u32x4* gate = (const u32x4*)gateUp + gw.first;
        const u32x4* up = (const u32x4*)gateUp + uw.first;
#pragma unroll 2
        for (int c = lane; c < chunks; c += 32, gate += gw.stride, up += uw.stride)
        {
            const u32x4 gv = *gate, uv = *up;
#pragma unroll
            for (int t = 0; t < MOE_T; t++)
                if (t < n)
                {
                    const u32x4 xv = rows[t][c];
                    g[t] += dot8(gv, xv);
                    u[t] += dot8(uv, xv);
                }
        }
#pragma unroll
        for (int t = 0; t < MOE_T; t++)
        {
            const float gs = warp_sum(g[t]), us = warp_sum(u[t]);
            if (lane == 0 && t < n) act[(long long)routed[first + t] * intermediate + feature] = float_to_bf16(silu(gs) * us);
        }
    }
}

// Small path, down: out[slot, h] = w_slot · (down_h · act[slot]) for the slots routed to expert blockIdx.x; 8 output
// features per block. Weights [E, H, I]. Grid: (E, ceil(H / 8)); block: 256.
template <int MOE_T>
__device__ __forceinline__ void moe_small_down_impl(const bf16* __restrict__ act, const bf16* __restrict__ down,
    const int* __restrict__ topIds, const float* __restrict__ topWeights, float* __restrict__ out, int slots, int hidden, int intermediate,
    int boxed)
{
    __shared__ int routed[MOE_MAX_SLOTS];
    __shared__ int count;
    const int e = blockIdx.x, lane = threadIdx.x & 31;
    collect_routed(topIds, slots, e, routed, &count);
    const int feature = blockIdx.y * 8 + (threadIdx.x >> 5);
    if (count == 0 || feature >= hidden) return;
    const RowWalk walk = row_walk((long long)e * hidden + feature, intermediate, lane, boxed);
    const int chunks = intermediate / 8;
    for (int first = 0; first < count; first += MOE_T)
    {
        const int n = min(MOE_T, count - first);
        const u32x4* inputs[MOE_T];
#pragma unroll
        for (int t = 0; t < MOE_T; t++) inputs[t] = (const u32x4*)(act + (long long)routed[first + min(t, n - 1)] * intermediate);
        float acc[MOE_T];
#pragma unroll
        for (int t = 0; t < MOE_T; t++) acc[t] = 0.f;
        const u32x4* row = (const u32x4*)down + walk.first;
#pragma unroll 4
        for (int c = lane; c < chunks; c += 32, row += walk.stride)
        {
            const u32x4 wv = *row;
#pragma unroll
            for (int t = 0; t < MOE_T; t++)
                if (t < n) acc[t] += dot8(wv, inputs[t][c]);
        }
#pragma unroll
        for (int t = 0; t < MOE_T; t++)
        {
            const float total = warp_sum(acc[t]);
            if (lane == 0 && t < n)
            {
                const int slot = routed[first + t];
                out[(long long)slot * hidden + feature] = total * topWeights[slot];
            }
        }
    }
}

#define MOE_SMALL(T) \
    extern "C" __global__ void __launch_bounds__(256) moe_small_gate_up_t##T(const bf16* __restrict__ x, const bf16* __restrict__ gateUp, \
        const int* __restrict__ topIds, bf16* __restrict__ act, int slots, int topK, int hidden, int intermediate, int boxed) \
    { kernel_prologue(); moe_small_gate_up_impl<T>(x, gateUp, topIds, act, slots, topK, hidden, intermediate, boxed); } \
    extern "C" __global__ void __launch_bounds__(256) moe_small_down_t##T(const bf16* __restrict__ act, const bf16* __restrict__ down, \
        const int* __restrict__ topIds, const float* __restrict__ topWeights, float* __restrict__ out, int slots, int hidden, int intermediate, \
        int boxed) \
    { kernel_prologue(); moe_small_down_impl<T>(act, down, topIds, topWeights, out, slots, hidden, intermediate, boxed); }
MOE_SMALL(1) MOE_SMALL(2) MOE_SMALL(4) MOE_SMALL(8) MOE_SMALL(16)

// One row (decode at batch 1), gate and up: block (k, 4 features) for the row's k-th expert, a warp a weight row: warps
// 0-3 the gate rows and 4-7 the up rows of features blockIdx.y·4 + (warp mod 4), the pairs meeting in shared memory.
// Blocks are launched only for the k routed experts (not for every expert, most of which would have nothing to do).
// A warp a row rather than a warp a feature (both its rows, as before session 33) halves the bytes a block reads and
// the registers a thread holds, and the step at batch 1 took 4% less (docs/performance.md, session 33); the sums are in
// the same order.
// With zeroDelta, the blocks of k = 0 also zero delta[0, 0 .. hidden) for moe_row_down to add into (I ≥ H).
// Grid: (K, ceil(I / 4)); block: 256.
extern "C" __global__ void __launch_bounds__(256) moe_row_gate_up(const bf16* __restrict__ x, const bf16* __restrict__ gateUp,
    const int* __restrict__ topIds, bf16* __restrict__ act, float* __restrict__ delta, int zeroDelta, int hidden, int intermediate, int boxed)
{
    kernel_prologue();
    __shared__ float gates[4];
    const int slot = blockIdx.x, e = topIds[slot], lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int feature = blockIdx.y * 4 + (warp & 3);
    const bool up = warp >= 4;
    if (zeroDelta && slot == 0 && threadIdx.x < 4 && blockIdx.y * 4 + threadIdx.x < hidden) delta[blockIdx.y * 4 + threadIdx.x] = 0.f;
    if (e < 0) return;  // the whole block: e is the block's
    float sum = 0.f;
    if (feature < intermediate)
    {
        const RowWalk walk = row_walk((long long)e * 2 * intermediate + (up ? intermediate : 0) + feature, hidden, lane, boxed);
        const u32x4* w = (const u32x4*)gateUp + walk.first;
        const u32x4* in = (const u32x4*)x;
#pragma unroll 8
        for (int c = lane; c < hidden / 8; c += 32, w += walk.stride) sum += dot8(*w, in[c]);
        sum = warp_sum(sum);
    }
    if (!up && lane == 0) gates[warp] = sum;
    __syncthreads();
    if (up && lane == 0 && feature < intermediate) act[(long long)slot * intermediate + feature] = float_to_bf16(silu(gates[warp & 3]) * sum);
}

// One row, down: w_k · (down_h · act[k]) for the row's k-th expert, a warp a feature. addToDelta (top-2 at most, where
// the two additions onto zero give the same bits in either order; delta zeroed by moe_row_gate_up, which needs I ≥ H):
// added into delta[0, h]; otherwise written to out[k, h] for moe_combine_slots. Grid: (K, ceil(H / 8)); block: 256.
extern "C" __global__ void __launch_bounds__(256) moe_row_down(const bf16* __restrict__ act, const bf16* __restrict__ down,
    const int* __restrict__ topIds, const float* __restrict__ topWeights, float* __restrict__ out, float* __restrict__ delta,
    int addToDelta, int hidden, int intermediate, int boxed)
{
    kernel_prologue();
    const int slot = blockIdx.x, e = topIds[slot], lane = threadIdx.x & 31;
    const int feature = blockIdx.y * 8 + (threadIdx.x >> 5);
    if (e < 0 || feature >= hidden) return;
    const RowWalk walk = row_walk((long long)e * hidden + feature, intermediate, lane, boxed);
    const u32x4* w = (const u32x4*)down + walk.first;
    const u32x4* in = (const u32x4*)(act + (long long)slot * intermediate);
    float acc = 0.f;
#pragma unroll 8
    for (int c = lane; c < intermediate / 8; c += 32, w += walk.stride) acc += dot8(*w, in[c]);
    acc = warp_sum(acc);
    if (lane != 0) return;
    if (addToDelta) atomicAdd(delta + feature, acc * topWeights[slot]);
    else out[(long long)slot * hidden + feature] = acc * topWeights[slot];
}

// delta[r] = Σ_k out[r·K + k] in k order (the small path's per-slot outputs, already weighted). Grid: (rows, column blocks); block: 256.
extern "C" __global__ void moe_combine_slots(const float* __restrict__ out, const int* __restrict__ topIds, float* __restrict__ delta,
    int topK, int hidden)
{
    kernel_prologue();
    const int r = blockIdx.x;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < hidden; c += gridDim.y * blockDim.x)
    {
        float sum = 0.f;
        for (int k = 0; k < topK; k++)
            if (topIds[r * topK + k] >= 0) sum += out[((long long)r * topK + k) * hidden + c];
        delta[(long long)r * hidden + c] = sum;
    }
}

// act[g, n] = silu(gu[g, n]) · gu[g, I + n] for every row g of a [groups·rows, 2I] bf16 gate/up product (cuBLAS's, rounded
// to bf16 as a bf16 Linear's output is), 8 features a thread (I a multiple of 8). Grid: (row count, ceil(I / 8 / 256));
// block: 256.
extern "C" __global__ void moe_silu_mul(const bf16* __restrict__ gateUp, bf16* __restrict__ act, int intermediate)
{
    kernel_prologue();
    const long long g = blockIdx.x;
    const int chunk = blockIdx.y * blockDim.x + threadIdx.x;
    if (chunk >= intermediate / 8) return;
    const u32x4 gate = ((const u32x4*)(gateUp + g * 2 * intermediate))[chunk];
    const u32x4 up = ((const u32x4*)(gateUp + g * 2 * intermediate + intermediate))[chunk];
    const unsigned gw[4] = {gate.x, gate.y, gate.z, gate.w}, uw[4] = {up.x, up.y, up.z, up.w};
    unsigned out[4];
#pragma unroll
    for (int q = 0; q < 4; q++)
        out[q] = pack_bf16x2(silu(lo_bf16(gw[q])) * lo_bf16(uw[q]), silu(hi_bf16(gw[q])) * hi_bf16(uw[q]));
    ((u32x4*)(act + g * intermediate))[chunk] = u32x4{out[0], out[1], out[2], out[3]};
}

// Dense path: delta[r] = Σ_k w_{r,k} · out[e_{r,k}, r] over [E, rows, H] outputs of every expert on every row, in k order.
// Grid: (rows, column blocks); block: 256.
extern "C" __global__ void moe_combine_dense(const float* __restrict__ out, const int* __restrict__ topIds,
    const float* __restrict__ topWeights, float* __restrict__ delta, int rows, int topK, int hidden)
{
    kernel_prologue();
    const int r = blockIdx.x;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < hidden; c += gridDim.y * blockDim.x)
    {
        float sum = 0.f;
        for (int k = 0; k < topK; k++)
        {
            const int e = topIds[r * topK + k];
            if (e >= 0) sum += topWeights[r * topK + k] * out[((long long)e * rows + r) * hidden + c];
        }
        delta[(long long)r * hidden + c] = sum;
    }
}

// Grouped path: the (row, k) slots sorted by expert, stable (slot order within an expert): offsets[E + 1], sorted[slots],
// and each slot's place in that order (−1 for padding). A thread a slot: first the counts (each warp's lanes of one expert
// found by __match_any_sync, one shared atomic a group), then the slots a block's width at a time, each placed at its
// expert's running start plus the counts of its expert in the warps before its own and its rank among its warp's lanes.
// (One warp an expert scanning every slot took about 55 µs for the 4,096 slots of a 2,048-row prefill on an H200.)
// Grid: 1; block: a multiple of 32, at most 1024.
extern "C" __global__ void __launch_bounds__(1024) moe_align(const int* __restrict__ topIds, int slots, int experts,
    int* __restrict__ offsets, int* __restrict__ sorted, int* __restrict__ placeOf)
{
    kernel_prologue();
    __shared__ int next[ROUTER_MAX_EXPERTS];               // each expert's first unused place
    __shared__ int before[32][ROUTER_MAX_EXPERTS];         // a chunk's counts a warp, then where each warp's slots start
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned below = (1u << lane) - 1u;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) next[e] = 0;
    __syncthreads();
    for (int base = 0; base < slots; base += blockDim.x)
    {
        const int s = base + threadIdx.x, e = s < slots ? topIds[s] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && (same & below) == 0) atomicAdd(&next[e], __popc(same));
    }
    __syncthreads();
    if (threadIdx.x == 0)
    {
        int running = 0;
        for (int e = 0; e < experts; e++)
        {
            offsets[e] = running;
            const int n = next[e];
            next[e] = running;
            running += n;
        }
        offsets[experts] = running;
    }
    __syncthreads();
    for (int base = 0; base < slots; base += blockDim.x)
    {
        const int s = base + threadIdx.x, e = s < slots ? topIds[s] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        for (int x = lane; x < experts; x += 32) before[warp][x] = 0;
        __syncwarp();
        if (e >= 0 && (same & below) == 0) before[warp][e] = __popc(same);
        __syncthreads();
        if (threadIdx.x < experts)
        {
            int running = next[threadIdx.x];
            for (int w = 0; w < warps; w++)
            {
                const int n = before[w][threadIdx.x];
                before[w][threadIdx.x] = running;
                running += n;
            }
            next[threadIdx.x] = running;
        }
        __syncthreads();
        if (s < slots)
        {
            if (e < 0) placeOf[s] = -1;
            else
            {
                const int place = before[warp][e] + __popc(same & below);
                sorted[place] = s;
                placeOf[s] = place;
            }
        }
        __syncthreads();  // every warp has read `before` before the next chunk writes it
    }
}

// Grouped path: xs[i] = x[row of sorted[i]] for i below offsets[E]. Grid: slots; block: 128.
extern "C" __global__ void moe_gather(const bf16* __restrict__ x, const int* __restrict__ sorted, const int* __restrict__ offsets,
    int experts, bf16* __restrict__ xs, int topK, int hidden)
{
    kernel_prologue();
    const int i = blockIdx.x;
    if (i >= offsets[experts]) return;
    const u32x4* in = (const u32x4*)(x + (long long)(sorted[i] / topK) * hidden);
    u32x4* o = (u32x4*)(xs + (long long)i * hidden);
    for (int c = threadIdx.x; c < hidden / 8; c += blockDim.x) o[c] = in[c];
}

// Grouped path: delta[r] = Σ_k w_{r,k} · out[place of (r, k)], in k order, where out[place] is the sum of the down GEMM's
// k splits in split order (split z at out + z·splitStride), 4 columns a thread (hidden a multiple of 8).
// Grid: (rows, ceil(hidden / 4 / 256)); block: 256.
extern "C" __global__ void moe_combine_grouped(const float* __restrict__ out, const int* __restrict__ placeOf,
    const float* __restrict__ topWeights, float* __restrict__ delta, int topK, int hidden, int splits, long long splitStride)
{
    kernel_prologue();
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= hidden / 4) return;
    f32x4 sum{0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < topK; k++)
    {
        const int place = placeOf[r * topK + k];
        if (place < 0) continue;
        const f32x4* o = (const f32x4*)(out + (long long)place * hidden) + c;
        f32x4 value = o[0];
        for (int z = 1; z < splits; z++)
        {
            const f32x4 part = o[z * splitStride / 4];
            value = f32x4{value.x + part.x, value.y + part.y, value.z + part.z, value.w + part.w};
        }
        const float weight = topWeights[r * topK + k];
        sum = f32x4{sum.x + weight * value.x, sum.y + weight * value.y, sum.z + weight * value.z, sum.w + weight * value.w};
    }
    ((f32x4*)(delta + (long long)r * hidden))[c] = sum;
}
