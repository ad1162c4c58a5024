// Shared by every kernel file. NVRTC compiles all files as one program with this first; nothing here includes a header,
// so bf16 is plain 16-bit storage converted by bit operations (exact, round-to-nearest-even as PyTorch rounds).
typedef unsigned short bf16;

#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

struct alignas(16) u32x4 { unsigned x, y, z, w; };
struct alignas(8) u32x2 { unsigned x, y; };
struct alignas(16) f32x4 { float x, y, z, w; };

// Every kernel's first statement. On Hopper and later the kernels are launched with programmatic dependent launch
// (CudaKernels.cs): launch_dependents lets the next kernel in the stream be scheduled once every block of this one has
// started (so its blocks never take an SM from one of ours still waiting to run), and wait holds this grid until the
// previous kernel has finished and its writes are visible. Nothing may read or write global memory before it. On older
// cards, or launched without the attribute, both instructions are no-ops.
__device__ __forceinline__ void kernel_prologue()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float bf16_to_float(bf16 v) { return __uint_as_float(((unsigned)v) << 16); }

__device__ __forceinline__ bf16 float_to_bf16(float f)
{
    unsigned bits = __float_as_uint(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;  // NaN stays a (quiet) NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16)(bits >> 16);
}

// The two bf16 halves of a 32-bit word as floats (element 2i is the low half, little-endian).
__device__ __forceinline__ float lo_bf16(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf16(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// A warp's walk over one row of a bf16 weight matrix [rows, k] in 16-byte pieces, lane l taking pieces l, l + 32, ...:
// the lane's first piece and the stride between its pieces, in the row-major layout or (boxed ≠ 0) the expert weights'
// boxed one (moe_box_weights in gemm_wgmma.cu: 128 × 64 boxes of 16 KB, pre-swizzled), where the 32 pieces of a pass lie
// in four consecutive boxes, and a lane's next pass four boxes on. k must be a multiple of 64 for the boxed layout.
struct RowWalk { long long first; int stride; };
__device__ __forceinline__ RowWalk row_walk(long long row, int k, int lane, int boxed)
{
    if (!boxed) return {row * (k / 8) + lane, 32};
    return {((row >> 7) * (k / 64) + (lane >> 3)) * 1024 + (row & 127) * 8 + ((lane & 7) ^ (int)(row & 7)), 4096};
}

// Σ of 8 products: 8 bf16 weights (one 16-byte load) times 8 bf16 activations.
__device__ __forceinline__ float dot8(u32x4 w, u32x4 x)
{
    float s = lo_bf16(w.x) * lo_bf16(x.x);
    s = fmaf(hi_bf16(w.x), hi_bf16(x.x), s);
    s = fmaf(lo_bf16(w.y), lo_bf16(x.y), s);
    s = fmaf(hi_bf16(w.y), hi_bf16(x.y), s);
    s = fmaf(lo_bf16(w.z), lo_bf16(x.z), s);
    s = fmaf(hi_bf16(w.z), hi_bf16(x.z), s);
    s = fmaf(lo_bf16(w.w), lo_bf16(x.w), s);
    s = fmaf(hi_bf16(w.w), hi_bf16(x.w), s);
    return s;
}

// Two floats as the two bf16 halves of a 32-bit word, the first in the low half (an mma operand register), rounded to
// nearest even as float_to_bf16 rounds (one cvt instruction from sm_80 on; a NaN stays a NaN, not necessarily 0x7fc0).
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
#else
    return (unsigned)float_to_bf16(lo) | ((unsigned)float_to_bf16(hi) << 16);
#endif
}

// Four bf16 (an 8-byte load) as floats, and four floats rounded to bf16 (an 8-byte store).
__device__ __forceinline__ f32x4 bf16x4_to_float(u32x2 v) { return f32x4{lo_bf16(v.x), hi_bf16(v.x), lo_bf16(v.y), hi_bf16(v.y)}; }
__device__ __forceinline__ u32x2 float_to_bf16x4(f32x4 v) { return u32x2{pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w)}; }

// A row split over a block (the norms and the router): thread t holds the row's 4-element chunks t, t + blockDim, ...,
// at most ROW_HELD of them, in registers; the host picks blockDim ≥ hidden / (4 · ROW_HELD) (hidden a multiple of 8),
// so rows of up to 16,384 at 1,024 threads.
#define ROW_HELD 4

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result. scratch: 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < warps; i++) total += scratch[i];  // the same order in every thread and every run
    return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = scratch[0];
    for (int i = 1; i < warps; i++) m = fmaxf(m, scratch[i]);
    return m;
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// ---- Tensor-core primitives (gemm.cu, attention.cu).

__device__ __forceinline__ unsigned shared_address(const void* p)
{
    unsigned address;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(address) : "l"(p));
    return address;
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (src is then not read).
__device__ __forceinline__ void copy_async16(unsigned destination, const void* source, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(source), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }

__device__ __forceinline__ void load_matrix_x4(unsigned address, unsigned* r)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// c += a · b for one 16×8 tile over 16 of k: a row-major (4 registers), b k-major per column (2 registers).
__device__ __forceinline__ void mma_16x8x16(float* c, const unsigned* a, unsigned b0, unsigned b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void load_matrix_x4_trans(unsigned address, unsigned* r)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
