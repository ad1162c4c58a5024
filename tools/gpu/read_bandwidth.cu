// Tooling, GPU machine: how fast the card reads, against how fast it copies. The rooflines use the device-to-device copy
// rate (bytes read plus written); a decode step only reads its weights, and the expert GEMMs stream them with TMA. This
// measures, on one card in one run:
//   - the copy (cudaMemcpyAsync of 4 GiB, counting bytes read plus written), as bench measures it;
//   - reads by 16-byte loads (plain and non-coherent), grid-stride, at several blocks a multiprocessor and loads in flight;
//   - reads by bulk TMA copies of contiguous chunks into shared memory (cp.async.bulk, one thread a block issuing, a ring
//     of stages), also with fewer blocks than multiprocessors;
//   - the same bytes as a [rows, 4096] bf16 matrix read through a 2-D tensor map in boxes of 128 rows x 64 columns, as the
//     expert GEMMs read their weights (each box 128 pieces of 128 bytes, 8 KB apart), and through a 3-D map whose boxes
//     take 2 or 4 consecutive k-tiles of each row;
//   - the 2-D map's boxes with each L2 promotion, 64 to 256 rows, one or two blocks a multiprocessor;
//   - the same bytes as a [rows, 64] matrix through a 2-D map, each 128 x 64 box 16 KB of consecutive bytes (the
//     boxed layout's boxes, read through the map instead of by bulk copies);
// each over 8 GiB (far past the L2), and the best of the first kinds again over 8 buffers of 235 MB read one launch each
// (one expert's gate and up rows, so that each launch's start and tail count).
// Times are CUDA events around each launch (median of 7 after 2 warm-ups). Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -o /tmp/read_bandwidth tools/gpu/read_bandwidth.cu -L/usr/local/cuda/lib64/stubs -lcuda && /tmp/read_bandwidth
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda.h>
#include <cuda_runtime.h>

#define CHECK(call)                                                                                     \
    do {                                                                                                \
        cudaError_t e_ = (call);                                                                        \
        if (e_ != cudaSuccess) {                                                                        \
            fprintf(stderr, "%s failed: %s (%s:%d)\n", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
            exit(1);                                                                                    \
        }                                                                                               \
    } while (0)

// Reads n 16-byte words, UNROLL independent loads in flight a thread, and folds them into one word a thread (written,
// so that the loads cannot be dropped).
template <int UNROLL, bool NC>
__global__ void read_loads(const uint4* __restrict__ p, long long n, unsigned* __restrict__ sink)
{
    unsigned acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride)
    {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
        {
            if (NC)
                asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                             : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p + i + u * stride));
            else
                v[u] = p[i + u * stride];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n; i += stride)
    {
        const uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    sink[(long long)blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// Waits until stage s's copies have landed (the phase of its barrier that bit s of `phase` names), flips that bit, and
// folds a word of the stage into acc, so that the copies cannot be dropped.
__device__ __forceinline__ void take_stage(unsigned long long* bars, int s, unsigned& phase, const unsigned char* stage, unsigned& acc)
{
    const unsigned parity = (phase >> s) & 1u;
    asm volatile(
        "{\n .reg .pred done;\n wait_%=:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        " @!done bra wait_%=;\n}" :: "r"(smem_addr(&bars[s])), "r"(parity) : "memory");
    phase ^= 1u << s;
    acc ^= *(volatile const unsigned*)stage;
}

// Each block reads chunks blockIdx.x, blockIdx.x + gridDim.x, ... of `chunk` bytes by bulk TMA copies into a ring of
// `stages` shared-memory buffers; thread 0 issues and waits, and folds one word of each chunk into its sink.
__global__ void read_tma(const char* __restrict__ p, long long chunks, unsigned chunk, int stages, unsigned* __restrict__ sink)
{
    extern __shared__ __align__(1024) unsigned char ring[];
    __shared__ __align__(8) unsigned long long bars[16];
    if (threadIdx.x != 0) return;
    for (int s = 0; s < stages; s++)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&bars[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    unsigned acc = 0;
    unsigned phase = 0;  // bit s: the parity to wait for on stage s
    long long k = 0;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x, k++)
    {
        const int s = (int)(k % stages);
        if (k >= stages)
        {
            take_stage(bars, s, phase, ring + (size_t)s * chunk, acc);
        }
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(&bars[s])), "r"(chunk) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(smem_addr(ring + (size_t)s * chunk)), "l"(p + c * (long long)chunk), "r"(chunk), "r"(smem_addr(&bars[s]))
                     : "memory");
    }
    // Drain: wait for the loads still in flight.
    const long long issued = k;
    for (long long j = issued > stages ? issued - stages : 0; j < issued; j++)
    {
        const int s = (int)(j % stages);
        take_stage(bars, s, phase, ring + (size_t)s * chunk, acc);
    }
    sink[blockIdx.x] = acc;
}

// The expert GEMMs' weight stream without their products: a bf16 matrix [rows, k] read by tensor-map TMA, one thread a
// block, persistent, tiles in steps of the grid, each tile's k-tiles in order. DEEP false: a 2-D map, boxes of boxRows
// rows x 64 columns (128 rows and the 128-byte swizzle as moe_tma's), a tile `boxes` boxes of consecutive rows, a stage a
// k-tile's boxes. DEEP true: a 3-D map of the same matrix ({64 columns, rows, k-tiles}, the k-tiles outermost), a tile
// boxRows rows, a stage one box of `depth` consecutive k-tiles (each row's depth x 128 bytes adjacent in memory), landing
// as depth [boxRows][64] tiles one after another, the layout the products read.
template <bool DEEP>
__global__ void read_tma_boxes(const __grid_constant__ CUtensorMap map, int tiles, int kTiles, int boxes, int depth, int stages,
                               unsigned* __restrict__ sink, int boxRows = 128)
{
    extern __shared__ __align__(1024) unsigned char ring[];
    if (threadIdx.x != 0) return;
    const unsigned stageBytes = 128u * boxRows * (DEEP ? depth : boxes);
    unsigned long long* bars = (unsigned long long*)(ring + (size_t)stages * stageBytes);
    for (int s = 0; s < stages; s++)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&bars[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    unsigned acc = 0, phase = 0;
    long long k = 0;
    for (int t = blockIdx.x; t < tiles; t += gridDim.x)
        for (int kt = 0; kt < kTiles; kt += DEEP ? depth : 1, k++)
        {
            const int s = (int)(k % stages);
            unsigned char* stage = ring + (size_t)s * stageBytes;
            if (k >= stages) take_stage(bars, s, phase, stage, acc);
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(&bars[s])), "r"(stageBytes) : "memory");
            if (DEEP)
                asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
                             :: "r"(smem_addr(stage)), "l"((unsigned long long)&map), "r"(0), "r"(t * boxRows), "r"(kt),
                                "r"(smem_addr(&bars[s])) : "memory");
            else
                for (int b = 0; b < boxes; b++)
                    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                                 :: "r"(smem_addr(stage + b * 128 * boxRows)), "l"((unsigned long long)&map), "r"(kt * 64),
                                    "r"((t * boxes + b) * boxRows), "r"(smem_addr(&bars[s])) : "memory");
        }
    for (long long j = k > stages ? k - stages : 0; j < k; j++) take_stage(bars, (int)(j % stages), phase, ring + (size_t)(j % stages) * stageBytes, acc);
    sink[blockIdx.x] = acc;
}

// A tensor map of `rank` dimensions over the buffer, bf16 with the 128-byte swizzle and (by default) the 256-byte L2
// promotion the expert GEMMs' maps use (CudaBackend's TensorMap).
static CUresult encode_map(CUtensorMap* map, unsigned rank, void* buffer, const cuuint64_t* dims, const cuuint64_t* strides,
                           const cuuint32_t* box, CUtensorMapL2promotion promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_256B)
{
    const cuuint32_t elementStrides[3] = {1, 1, 1};
    return cuTensorMapEncodeTiled(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, buffer, dims, strides, box, elementStrides,
                                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

template <typename Launch>
static double median_ms(Launch launch, int reps = 7, int warmup = 2)
{
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    std::vector<float> t;
    for (int i = 0; i < warmup + reps; i++)
    {
        CHECK(cudaEventRecord(a));
        launch(i);
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        CHECK(cudaGetLastError());
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        if (i >= warmup) t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    CHECK(cudaEventDestroy(a));
    CHECK(cudaEventDestroy(b));
    return t[t.size() / 2];
}

int main()
{
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d multiprocessors, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);

    const long long big = 8LL << 30;
    char* buffer;
    CHECK(cudaMalloc(&buffer, big));
    CHECK(cudaMemset(buffer, 1, big));
    unsigned* sink;
    CHECK(cudaMalloc(&sink, 64 << 20));

    {
        const long long half = 4LL << 30;
        const double ms = median_ms([&](int) { CHECK(cudaMemcpyAsync(buffer + half, buffer, half, cudaMemcpyDeviceToDevice)); });
        printf("copy 4 GiB (read + write)                    %7.3f ms  %5.2f TB/s\n", ms, 2.0 * half / ms / 1e9);
    }

    const long long words = big / 16;
    auto loads = [&](auto kernel, int blocksPerSm, int threads, long long n, const char* p) {
        const int grid = sms * blocksPerSm;
        const double ms = median_ms([&](int) { kernel<<<grid, threads>>>((const uint4*)p, n, sink); });
        return ms;
    };
    for (int bps : {2, 4, 8, 16})
    {
        const double t4 = loads(read_loads<4, false>, bps, 256, words, buffer);
        const double t8 = loads(read_loads<8, false>, bps, 256, words, buffer);
        const double n4 = loads(read_loads<4, true>, bps, 256, words, buffer);
        const double n8 = loads(read_loads<8, true>, bps, 256, words, buffer);
        printf("16-byte loads, 8 GiB, %2d blocks of 256 a SM: ld x4 %5.2f, ld x8 %5.2f, nc x4 %5.2f, nc x8 %5.2f TB/s\n", bps,
               big / t4 / 1e9, big / t8 / 1e9, big / n4 / 1e9, big / n8 / 1e9);
    }

    CHECK(cudaFuncSetAttribute(read_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    for (unsigned chunk : {16384u, 32768u, 65536u})
        for (int stages : {2, 4, 6})
        {
            const size_t smem = (size_t)chunk * stages;
            if (smem > 200 * 1024) continue;
            for (int bps : {1, 2})
            {
                if (smem * bps > 220 * 1024) continue;
                const long long chunks = big / chunk;
                const double ms = median_ms([&](int) { read_tma<<<sms * bps, 32, smem>>>(buffer, chunks, chunk, stages, sink); });
                printf("bulk TMA, 8 GiB, chunk %5u B x %d stages, %d block(s) a SM: %5.2f TB/s\n", chunk, stages, bps, big / ms / 1e9);
            }
        }

    // Fewer blocks than multiprocessors (a projection of 6,144 or 4,096 features has 48 or 32 tiles of 128): what one
    // multiprocessor's copies can pull, a block each.
    for (int blocks : {16, 32, 48, 64, 96})
    {
        const long long chunks = big / 32768;
        const double ms = median_ms([&](int) { read_tma<<<blocks, 32, 6 * 32768>>>(buffer, chunks, 32768, 6, sink); });
        printf("bulk TMA, 8 GiB, chunk 32768 B x 6 stages, %3d blocks in all: %5.2f TB/s (%.1f GB/s a block)\n", blocks,
               big / ms / 1e9, big / ms / 1e6 / blocks);
    }

    // The same bytes as a [rows, 4096] bf16 matrix in 128 x 64 boxes (the expert GEMMs' way), against the contiguous chunks.
    {
        const long long k = 4096, rows = big / (2 * k);
        CUtensorMap map;
        cuuint64_t dims[2] = {(cuuint64_t)k, (cuuint64_t)rows};
        cuuint64_t strides[1] = {(cuuint64_t)(2 * k)};
        const cuuint32_t box[2] = {64, 128};
        const CUresult r = encode_map(&map, 2, buffer, dims, strides, box);
        if (r != CUDA_SUCCESS) { fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", (int)r); exit(1); }
        CHECK(cudaFuncSetAttribute(read_tma_boxes<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, 210 * 1024));
        for (int boxes : {1, 2})
            for (int stages : {4, 6, 8, 12})
            {
                const size_t smem = (size_t)stages * 16384 * boxes + 16 * 8;
                if (smem > 210 * 1024) continue;
                const int tiles = (int)(rows / (128 * boxes)), kTiles = (int)(k / 64);
                const double ms = median_ms([&](int) { read_tma_boxes<false><<<sms, 32, smem>>>(map, tiles, kTiles, boxes, 1, stages, sink); });
                printf("tensor-map TMA, 8 GiB as [%lld, 4096], tiles of %d x 128 rows, %2d stages, 1 block a SM: %5.2f TB/s\n", rows, boxes,
                       stages, big / ms / 1e9);
            }
    }

    // The 2-D boxes again, varied where the expert GEMMs could vary them: the L2 promotion (none, 64, 128, 256 bytes),
    // boxes of 64, 128 or 256 rows (one box a stage, 8 to 32 KB), and two blocks a multiprocessor, each with its own ring.
    {
        const long long k = 4096, rows = big / (2 * k);
        const struct { CUtensorMapL2promotion value; const char* name; } promotions[] = {
            {CU_TENSOR_MAP_L2_PROMOTION_NONE, "none"}, {CU_TENSOR_MAP_L2_PROMOTION_L2_64B, "64 B"},
            {CU_TENSOR_MAP_L2_PROMOTION_L2_128B, "128 B"}, {CU_TENSOR_MAP_L2_PROMOTION_L2_256B, "256 B"}};
        for (const auto& promotion : promotions)
            for (int boxRows : {64, 128, 256})
            {
                CUtensorMap map;
                cuuint64_t dims[2] = {(cuuint64_t)k, (cuuint64_t)rows};
                cuuint64_t strides[1] = {(cuuint64_t)(2 * k)};
                const cuuint32_t box[2] = {64, (cuuint32_t)boxRows};
                const CUresult r = encode_map(&map, 2, buffer, dims, strides, box, promotion.value);
                if (r != CUDA_SUCCESS) { printf("2-D map, boxes of %d rows, promotion %s: cuTensorMapEncodeTiled refused it (%d)\n", boxRows, promotion.name, (int)r); continue; }
                for (int bps : {1, 2})
                {
                    const int stages = std::min(16, (int)(192 * 1024 / bps / (128 * boxRows)));
                    const size_t smem = (size_t)stages * 128 * boxRows + 16 * 8;
                    const int tiles = (int)(rows / boxRows), kTiles = (int)(k / 64);
                    const double ms = median_ms([&](int) {
                        read_tma_boxes<false><<<sms * bps, 32, smem>>>(map, tiles, kTiles, 1, 1, stages, sink, boxRows); });
                    printf("tensor-map TMA, [%lld, 4096], boxes of %3d rows, promotion %-5s, %2d stages, %d block(s) a SM: %5.2f TB/s\n", rows,
                           boxRows, promotion.name, stages, bps, big / ms / 1e9);
                }
            }
    }

    // The same bytes as a [rows, 64] bf16 matrix (each row 128 bytes, the next row's right after it) in 128 x 64 boxes:
    // every box 16 KB of consecutive bytes, as the boxed layout of the expert weights stores them, read through the
    // tensor map; against the 2-D boxes above (8 KB apart) and the bulk copies of the same chunks.
    {
        const long long rows = big / 128;
        CUtensorMap map;
        cuuint64_t dims[2] = {64, (cuuint64_t)rows};
        cuuint64_t strides[1] = {128};
        const cuuint32_t box[2] = {64, 128};
        const CUresult r = encode_map(&map, 2, buffer, dims, strides, box);
        if (r != CUDA_SUCCESS) { fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", (int)r); exit(1); }
        for (int boxes : {1, 2})
            for (int stages : {4, 6, 8, 12})
            {
                const size_t smem = (size_t)stages * 16384 * boxes + 16 * 8;
                if (smem > 210 * 1024) continue;
                const int tiles = (int)(rows / (128 * boxes));
                const double ms = median_ms([&](int) { read_tma_boxes<false><<<sms, 32, smem>>>(map, tiles, 1, boxes, 1, stages, sink); });
                printf("tensor-map TMA, 8 GiB as [%lld, 64] (boxes contiguous), %d box(es) a stage, %2d stages, 1 block a SM: %5.2f TB/s\n",
                       rows, boxes, stages, big / ms / 1e9);
            }
    }

    // The same matrix through a 3-D map, boxes of 128 rows x depth k-tiles.
    {
        const long long k = 4096, rows = big / (2 * k), kTiles = k / 64;
        CUtensorMap map;
        cuuint64_t dims[3] = {64, (cuuint64_t)rows, (cuuint64_t)kTiles};
        cuuint64_t strides[2] = {(cuuint64_t)(2 * k), 128};
        CHECK(cudaFuncSetAttribute(read_tma_boxes<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, 210 * 1024));
        for (int depth : {2, 4})
        {
            const cuuint32_t box[3] = {64, 128, (cuuint32_t)depth};
            const CUresult r = encode_map(&map, 3, buffer, dims, strides, box);
            if (r != CUDA_SUCCESS) { printf("3-D map with k-tiles outermost, depth %d: cuTensorMapEncodeTiled refused it (%d)\n", depth, (int)r); continue; }
            for (int stages : {3, 6})
            {
                const size_t smem = (size_t)stages * 16384 * depth + 16 * 8;
                if (smem > 210 * 1024) continue;
                const double ms = median_ms([&](int) { read_tma_boxes<true><<<sms, 32, smem>>>(map, (int)(rows / 128), (int)kTiles, 1, depth, stages, sink); });
                printf("3-D tensor-map TMA, boxes of 128 rows x %d k-tiles, %d stages, 1 block a SM: %5.2f TB/s\n", depth, stages, big / ms / 1e9);
            }
        }
    }

    // Launch by launch over 8 buffers of 234.9 MB (7 · 2^25 bytes: one expert's gate and up rows, 2 · 14,336 · 4,096 bf16),
    // so that each launch's start and tail count.
    const long long layer = 234881024LL;
    for (int variant = 0; variant < 2; variant++)
    {
        const double ms = median_ms([&](int) {
            for (int b = 0; b < 8; b++)
            {
                const char* p = buffer + (long long)b * (layer + 4096);
                if (variant == 0) read_loads<8, true><<<sms * 8, 256>>>((const uint4*)p, layer / 16, sink);
                else read_tma<<<sms, 32, 4 * 32768>>>(p, layer / 32768, 32768, 4, sink);
            }
        });
        printf("8 launches of 235 MB, %s: %.3f ms, %5.2f TB/s\n", variant == 0 ? "nc x8 loads, 8 blocks a SM" : "bulk TMA 32 KB x 4, 1 block a SM",
               ms, 8.0 * layer / ms / 1e9);
    }
    CHECK(cudaFree(buffer));
    CHECK(cudaFree(sink));
    return 0;
}
