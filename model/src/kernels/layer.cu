// Element-wise layer kernels for kvquilt's GPU path. Built to PTX by model/build.rs (feature `gpu`).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float2 unpack(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ float2 unpack(__half2 h) { return __half22float2(h); }
template <typename T2> __device__ __forceinline__ T2 pack2(float a, float b);
template <> __device__ __forceinline__ __nv_bfloat162 pack2(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}
template <> __device__ __forceinline__ __half2 pack2(float a, float b) { return __floats2half2_rn(a, b); }

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

// SwiGLU: out[r, c] = silu(gate_up[r, c]) * gate_up[r, inter + c], computed in f32 and rounded
// once. gate_up is [rows, 2 * inter] row-major with row stride `stride` (elements); out is
// [rows, inter] contiguous. Eight elements per thread (inter % 8 == 0, 16-byte aligned rows).
template <typename T2>
__device__ __forceinline__ void swiglu(const T2 *gate_up, T2 *out, int rows, int inter, int stride) {
  const int per_row = inter / 8;
  const size_t total = static_cast<size_t>(rows) * per_row;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t r = i / per_row, c = (i % per_row) * 8;
    const uint4 g = *reinterpret_cast<const uint4 *>(gate_up + (r * stride + c) / 2);
    const uint4 u = *reinterpret_cast<const uint4 *>(gate_up + (r * stride + inter + c) / 2);
    uint4 o;
    const T2 *gp = reinterpret_cast<const T2 *>(&g), *up = reinterpret_cast<const T2 *>(&u);
    T2 *op = reinterpret_cast<T2 *>(&o);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = unpack(gp[j]), b = unpack(up[j]);
      op[j] = pack2<T2>(silu(a.x) * b.x, silu(a.y) * b.y);
    }
    *reinterpret_cast<uint4 *>(out + (r * inter + c) / 2) = o;
  }
}

extern "C" __global__ void swiglu_bf16(const __nv_bfloat162 *gate_up, __nv_bfloat162 *out, int rows,
                                       int inter, int stride) {
  swiglu(gate_up, out, rows, inter, stride);
}

extern "C" __global__ void swiglu_f16(const __half2 *gate_up, __half2 *out, int rows, int inter,
                                      int stride) {
  swiglu(gate_up, out, rows, inter, stride);
}

// Row scatter: dst row idx[r] = src row r for r < n, rows of `words` machine words of type W
// (16-byte, 4-byte or 2-byte, whichever divides the row's bytes, both bases and the source's
// row stride), source rows `src_stride` words apart. idx holds distinct rows (checked on the
// host), so no two threads write one word.
template <typename W>
__device__ __forceinline__ void set_rows(W *dst, const W *src, const uint32_t *idx, int n, int words,
                                         long long src_stride) {
  const size_t total = static_cast<size_t>(n) * words;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t r = i / words, c = i % words;
    dst[static_cast<size_t>(idx[r]) * words + c] = src[r * src_stride + c];
  }
}

extern "C" __global__ void set_rows_w16(uint4 *dst, const uint4 *src, const uint32_t *idx, int n,
                                        int words, long long src_stride) {
  set_rows(dst, src, idx, n, words, src_stride);
}

extern "C" __global__ void set_rows_w4(uint32_t *dst, const uint32_t *src, const uint32_t *idx,
                                       int n, int words, long long src_stride) {
  set_rows(dst, src, idx, n, words, src_stride);
}

extern "C" __global__ void set_rows_w2(uint16_t *dst, const uint16_t *src, const uint32_t *idx,
                                       int n, int words, long long src_stride) {
  set_rows(dst, src, idx, n, words, src_stride);
}

// Row copies in one launch: copy p (blockIdx.y) moves `words[p]` words of type W from `src[p]`
// to `dst[p]` (both absolute addresses), reading rows of `row_words[p]` words that start
// `src_stride[p]` words apart (== row_words: a packed source, copied flat; larger: a strided
// view such as K or V inside the fused QKV projection) and writing them packed. The table
// travels as a kernel parameter (under the 4 KiB limit). One launch serves a concatenation
// (every copy into one fresh buffer), rows put into a preallocated cache, or a whole model's
// layers loaded at once (each copy into its own buffer).
#define CAT_MAX_PARTS 96
struct CatTable {
  unsigned long long src[CAT_MAX_PARTS];
  unsigned long long dst[CAT_MAX_PARTS];
  unsigned long long words[CAT_MAX_PARTS];
  unsigned long long src_stride[CAT_MAX_PARTS];
  unsigned long long row_words[CAT_MAX_PARTS];
};

template <typename W>
__device__ __forceinline__ void cat_rows(const CatTable &t) {
  const int p = blockIdx.y;
  const W *src = reinterpret_cast<const W *>(t.src[p]);
  W *out = reinterpret_cast<W *>(t.dst[p]);
  const size_t words = t.words[p], row = t.row_words[p], stride = t.src_stride[p];
  const size_t step = static_cast<size_t>(gridDim.x) * blockDim.x;
  if (stride == row) {
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < words; i += step) {
      out[i] = src[i];
    }
  } else {
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < words; i += step) {
      const size_t r = i / row;
      out[i] = src[r * stride + (i - r * row)];
    }
  }
}

extern "C" __global__ void cat_rows_w16(const CatTable t) { cat_rows<uint4>(t); }
extern "C" __global__ void cat_rows_w4(const CatTable t) { cat_rows<uint32_t>(t); }
extern "C" __global__ void cat_rows_w2(const CatTable t) { cat_rows<uint16_t>(t); }

// Row gathers in one launch: gather p (blockIdx.y) writes `rows[p]` rows of `row_words[p]`
// words of type W, packed at `dst[p]`, row r being row `index[p][r]` (u32) of the packed
// source `src[p]` of `src_rows[p]` rows. An index past the source's rows writes a row of
// zeros (the host built the indices; the kernel still reads nothing outside a source). One
// launch moves every layer's K and V rows of a decode pool's reselection, where `index_select`
// took one launch per buffer. The table travels as a kernel parameter (under 4 KiB).
#define GATHER_MAX_PARTS 64
struct GatherTable {
  unsigned long long src[GATHER_MAX_PARTS];
  unsigned long long index[GATHER_MAX_PARTS];
  unsigned long long dst[GATHER_MAX_PARTS];
  unsigned long long rows[GATHER_MAX_PARTS];
  unsigned long long src_rows[GATHER_MAX_PARTS];
  unsigned long long row_words[GATHER_MAX_PARTS];
};

template <typename W>
__device__ __forceinline__ void gather_rows(const GatherTable &t) {
  const int p = blockIdx.y;
  const W *src = reinterpret_cast<const W *>(t.src[p]);
  const uint32_t *index = reinterpret_cast<const uint32_t *>(t.index[p]);
  W *out = reinterpret_cast<W *>(t.dst[p]);
  const size_t row = t.row_words[p], words = t.rows[p] * row, src_rows = t.src_rows[p];
  const size_t step = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < words; i += step) {
    const size_t r = i / row;
    const size_t from = index[r];
    out[i] = from < src_rows ? src[from * row + (i - r * row)] : W{};
  }
}

extern "C" __global__ void gather_rows_w16(const GatherTable t) { gather_rows<uint4>(t); }
extern "C" __global__ void gather_rows_w4(const GatherTable t) { gather_rows<uint32_t>(t); }
extern "C" __global__ void gather_rows_w2(const GatherTable t) { gather_rows<uint16_t>(t); }

// RMSNorm of each row, optionally after a residual add; one block per row. With `r`: h_out = h +
// r (rounded to T once) and x_out = norm(h_out); without (`r` and `h_out` null): x_out = norm(h).
// norm(y) = y * rsqrt(mean(y^2) + eps) * w, in f32 from the rounded y (what an unfused add then
// candle's rms_norm computes, up to the order of the row's sum of squares). Rows are packed,
// `hidden` is even, the block holds at most 32 warps.
template <typename T2>
__device__ __forceinline__ void add_rms_norm(const T2 *h, const T2 *r, const T2 *w, T2 *h_out,
                                             T2 *x_out, int rows, int hidden, float eps) {
  const int row = blockIdx.x;
  if (row >= rows) return;
  const int pairs = hidden / 2;
  const size_t base = static_cast<size_t>(row) * pairs;
  float sq = 0.f;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    T2 y = h[base + i];
    if (r != nullptr) {
      const float2 a = unpack(y), b = unpack(r[base + i]);
      y = pack2<T2>(a.x + b.x, a.y + b.y);
      h_out[base + i] = y;
    }
    const float2 f = unpack(y);
    sq += f.x * f.x + f.y * f.y;
  }
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffff, sq, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = sq;
  __syncthreads();
  if (warp == 0) {
    sq = lane < (blockDim.x + 31) / 32 ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffff, sq, o);
    if (lane == 0) warp_sums[0] = sq;
  }
  __syncthreads();
  const float scale = rsqrtf(warp_sums[0] / hidden + eps);
  // each thread reads back only the elements it wrote above
  const T2 *y = (r != nullptr ? h_out : h) + base;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const float2 f = unpack(y[i]), g = unpack(w[i]);
    x_out[base + i] = pack2<T2>(f.x * scale * g.x, f.y * scale * g.y);
  }
}

extern "C" __global__ void add_rms_norm_bf16(const __nv_bfloat162 *h, const __nv_bfloat162 *r,
                                             const __nv_bfloat162 *w, __nv_bfloat162 *h_out,
                                             __nv_bfloat162 *x_out, int rows, int hidden, float eps) {
  add_rms_norm(h, r, w, h_out, x_out, rows, hidden, eps);
}

extern "C" __global__ void add_rms_norm_f16(const __half2 *h, const __half2 *r, const __half2 *w,
                                            __half2 *h_out, __half2 *x_out, int rows, int hidden,
                                            float eps) {
  add_rms_norm(h, r, w, h_out, x_out, rows, hidden, eps);
}
