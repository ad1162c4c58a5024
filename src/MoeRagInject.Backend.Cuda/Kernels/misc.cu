// x[r] += scale[slot, layer] · vector[slot] for rows at positions in [start, end) of their slot's injection (hook point
// l_out-l: the model adds it to the MoE output just before the residual add). Padding rows (slot −1) are skipped.
// Grid: rows; block: 256.
extern "C" __global__ void add_injection(float* __restrict__ x, const float* __restrict__ vectors, const float* __restrict__ scales,
    const int* __restrict__ starts, const int* __restrict__ ends, const int* __restrict__ positions, const int* __restrict__ rowSequence,
    const int* __restrict__ seqSlot, int layer, int layers, int hidden)
{
    kernel_prologue();
    const int r = blockIdx.x;
    const int slot = seqSlot[rowSequence[r]];
    if (slot < 0) return;
    const float scale = scales[slot * layers + layer];
    const int position = positions[r];
    if (scale == 0.f || position < starts[slot] || position >= ends[slot]) return;
    const float* v = vectors + (long long)slot * hidden;
    float* row = x + (long long)r * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) row[c] = fmaf(scale, v[c], row[c]);
}

// out[i] = x[last row of sequence i] (bf16 rows). Grid: sequences; block: 128.
extern "C" __global__ void gather_last_rows(const bf16* __restrict__ x, bf16* __restrict__ out, const int* __restrict__ queryStart, int hidden)
{
    kernel_prologue();
    const int i = blockIdx.x;
    const bf16* in = x + (long long)(queryStart[i + 1] - 1) * hidden;
    bf16* o = out + (long long)i * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = in[c];
}

// bf16 → fp32 copy, for reading bf16 activations back on the host. Grid-stride.
extern "C" __global__ void bf16_to_f32(const bf16* __restrict__ in, float* __restrict__ out, long long n)
{
    kernel_prologue();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = bf16_to_float(in[i]);
}

// Dummy weights, the same function as Checkpoint.DummyValue on the host: uniform on [−0.02·√3, 0.02·√3) from a SplitMix64
// hash of (seed, tensor, index), rounded to bf16; norms are 1. Grid-stride.
extern "C" __global__ void fill_dummy(bf16* __restrict__ out, long long n, unsigned long long seed, int tensor, int isNorm)
{
    kernel_prologue();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    {
        if (isNorm)
        {
            out[i] = (bf16)0x3f80;
            continue;
        }
        unsigned long long z = seed ^ ((unsigned long long)tensor << 48) ^ (unsigned long long)i;
        z += 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.f / 16777216.f);
        out[i] = float_to_bf16((2.f * u - 1.f) * 0.034641016f);
    }
}

// counts[slot, token] += 1 for each accepted (slot, token) pair. Grid-stride over pairs.
extern "C" __global__ void count_accepted(int* __restrict__ counts, const int* __restrict__ pairs, int n, int vocab)
{
    kernel_prologue();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        atomicAdd(&counts[(long long)pairs[2 * i] * vocab + pairs[2 * i + 1]], 1);
}

// A slot's penalty state for a new request: counts zeroed, the prompt mask set from its prompt ids. Grid-stride.
extern "C" __global__ void reset_penalties(int* __restrict__ counts, unsigned char* __restrict__ mask, int slot, int vocab)
{
    kernel_prologue();
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < vocab; v += gridDim.x * blockDim.x)
    {
        counts[(long long)slot * vocab + v] = 0;
        mask[(long long)slot * vocab + v] = 0;
    }
}

extern "C" __global__ void mark_prompt(unsigned char* __restrict__ mask, int slot, int vocab, const int* __restrict__ ids, int n)
{
    kernel_prologue();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    {
        const int id = ids[i];
        if (id >= 0 && id < vocab) mask[(long long)slot * vocab + id] = 1;
    }
}

// table[pairs[2i]] = pairs[2i + 1]: the block-table entries the host changed since the last step. Grid-stride over pairs.
extern "C" __global__ void set_entries(int* __restrict__ table, const int* __restrict__ pairs, int n)
{
    kernel_prologue();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) table[pairs[2 * i]] = pairs[2 * i + 1];
}
