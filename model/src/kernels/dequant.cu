// Dequantisation of stored KV records on the device: the 8-bit codecs (fp8, int8) and KIVI
// (2, 4 and 8 bits). Built to PTX by model/build.rs (feature `gpu`), launched by dequant.rs.
//
// An 8-bit record (compression::codec::Scaled8) is `scales` f32 values f (scales, then any zero
// points) then 2 * half code bytes, K's then V's. Element i of half h decodes, with
// s = (i / div_h) % mod_h + (i / odiv_h) * ostride_h, as
// value(code) * f[base_h + s]                        (off_h == 0: no zero points)
// value(code) * f[base_h + s] + f[off_h + s]         (otherwise; __fmul_rn then __fadd_rn)
// computed in f32 and rounded once to the output type: the formula of the CPU decoder
// (Scaled8::decode_into), so both give the same bits (a NaN code, which no encoder writes,
// decodes to a NaN on both, not necessarily the same NaN).
//
// Four elements per thread: half % 4 == 0 and the record 4-byte aligned (checked by the
// launcher), so codes are read as one u32 and outputs written as one vector.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// fp8 e4m3fn -> f32, exactly: subnormals m * 2^-9, normals (1 + m/8) * 2^(e-7), 0x7F/0xFF NaN.
__device__ __forceinline__ float e4m3(uint32_t c) {
  const uint32_t sign = (c & 0x80u) << 24, e = (c >> 3) & 0xFu, m = c & 7u;
  if (e == 0xFu && m == 7u) return __uint_as_float(sign | 0x7FC00000u);
  if (e == 0u) {
    const float mag = static_cast<float>(m) * (1.0f / 512.0f);
    return sign ? -mag : mag;
  }
  return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}

template <bool FP8> __device__ __forceinline__ float value(uint32_t c) {
  if (FP8) return e4m3(c);
  return static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(c)));
}

template <typename T> struct Out4;
template <> struct Out4<float> {
  using V = float4;
  static __device__ __forceinline__ V pack(float a, float b, float c, float d) { return make_float4(a, b, c, d); }
};
template <> struct Out4<__nv_bfloat16> {
  using V = uint2;
  static __device__ __forceinline__ V pack(float a, float b, float c, float d) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
    return make_uint2(*reinterpret_cast<const uint32_t *>(&lo), *reinterpret_cast<const uint32_t *>(&hi));
  }
};
template <> struct Out4<__half> {
  using V = uint2;
  static __device__ __forceinline__ V pack(float a, float b, float c, float d) {
    const __half2 lo = __floats2half2_rn(a, b), hi = __floats2half2_rn(c, d);
    return make_uint2(*reinterpret_cast<const uint32_t *>(&lo), *reinterpret_cast<const uint32_t *>(&hi));
  }
};

// One half's scale map (ScaleMap in compression/src/codec/scaled8.rs).
// off: where the half's zero points start, 0 when it has none (f[0] is always K's first scale).
struct Map {
  uint32_t base, div, mod, odiv, ostride, off;
  __device__ __forceinline__ uint32_t slot(uint32_t j) const { return (j / div) % mod + (j / odiv) * ostride; }
};

template <typename T, bool FP8>
__device__ __forceinline__ void dequant8(const uint8_t *rec, uint32_t codes_at, uint32_t half, Map k, Map v,
                                         T *out) {
  const float *scales = reinterpret_cast<const float *>(rec);
  const uint32_t *codes = reinterpret_cast<const uint32_t *>(rec + codes_at);
  using V = typename Out4<T>::V;
  V *out4 = reinterpret_cast<V *>(out);
  const uint32_t quads = half / 2; // 2 * half elements, four per quad
  for (uint32_t q = blockIdx.x * blockDim.x + threadIdx.x; q < quads; q += gridDim.x * blockDim.x) {
    const uint32_t i = 4 * q;
    const bool is_v = i >= half;
    const uint32_t j = is_v ? i - half : i;
    const Map m = is_v ? v : k;
    const uint32_t c = codes[q];
    float x[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t s = m.slot(j + e);
      const float v = __fmul_rn(value<FP8>((c >> (8 * e)) & 0xFFu), scales[m.base + s]);
      x[e] = m.off ? __fadd_rn(v, scales[m.off + s]) : v;
    }
    out4[q] = Out4<T>::pack(x[0], x[1], x[2], x[3]);
  }
}

#define DEQUANT_ENTRY(NAME, T, FP8)                                                                            \
  extern "C" __global__ void NAME(const uint8_t *rec, uint32_t codes_at, uint32_t half, uint32_t kb,           \
                                  uint32_t kd, uint32_t km, uint32_t kod, uint32_t kos, uint32_t ko, uint32_t vb, \
                                  uint32_t vd, uint32_t vm, uint32_t vod, uint32_t vos, uint32_t vo, T *out) {  \
    dequant8<T, FP8>(rec, codes_at, half, Map{kb, kd, km, kod, kos, ko}, Map{vb, vd, vm, vod, vos, vo}, out);  \
  }

DEQUANT_ENTRY(dequant_int8_f32, float, false)
DEQUANT_ENTRY(dequant_int8_bf16, __nv_bfloat16, false)
DEQUANT_ENTRY(dequant_int8_f16, __half, false)
DEQUANT_ENTRY(dequant_fp8_f32, float, true)
DEQUANT_ENTRY(dequant_fp8_bf16, __nv_bfloat16, true)
DEQUANT_ENTRY(dequant_fp8_f16, __half, true)

// KIVI records (compression::codec::KiviRecord): per half, element j in token row t = j / row,
// column c = j % row. Rows t < tq decode as min + code * step from an f16 (min, step) pair
// (K: per token group and channel; V: per token, head and channel group), computed as
// __fmul_rn then __fadd_rn (the CPU decoder's separate rounding, no fused multiply-add) and
// rounded once to the output type; rows t >= tq are the record's exact bytes, copied as they
// are. Four elements per thread (half % 4 == 0, checked by the launcher); indices fit in 32
// bits because the launcher refuses records of 2^32 bytes or more.
struct Kivi {
  uint32_t half, row, d, heads, group, v_groups, tq, k_pairs, codes_at, code_bytes, residual_at, residual_bytes;
};

template <typename T> struct Elem;
template <> struct Elem<float> {
  static __device__ __forceinline__ uint32_t bits(float x) { return __float_as_uint(x); }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ uint32_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <typename T, uint32_t BITS>
__device__ __forceinline__ uint32_t kivi_elem(const uint8_t *rec, const Kivi &p, uint32_t h, uint32_t j) {
  constexpr uint32_t ES = sizeof(T), PER_BYTE = 8 / BITS, MASK = (1u << BITS) - 1u;
  const uint32_t t = j / p.row, c = j - t * p.row;
  if (t >= p.tq) {
    const uint8_t *src = rec + p.residual_at + h * p.residual_bytes + (j - p.tq * p.row) * ES;
    uint32_t v = 0;
#pragma unroll
    for (uint32_t b = 0; b < ES; ++b) v |= static_cast<uint32_t>(src[b]) << (8 * b);
    return v;
  }
  const uint32_t byte = rec[p.codes_at + h * p.code_bytes + j / PER_BYTE];
  const uint32_t code = (byte >> ((j % PER_BYTE) * BITS)) & MASK;
  const uint32_t pair = h == 0 ? (t / p.group) * p.row + c
                               : p.k_pairs + (t * p.heads + c / p.d) * p.v_groups + (c % p.d) / p.group;
  const uint32_t ms = *reinterpret_cast<const uint32_t *>(rec + 4 * pair);
  const float min = __half2float(__ushort_as_half(static_cast<unsigned short>(ms & 0xFFFFu)));
  const float step = __half2float(__ushort_as_half(static_cast<unsigned short>(ms >> 16)));
  return Elem<T>::bits(__fadd_rn(min, __fmul_rn(static_cast<float>(code), step)));
}

template <typename T, uint32_t BITS> __device__ __forceinline__ void dequant_kivi(const uint8_t *rec, Kivi p, T *out) {
  const uint32_t quads = p.half / 2;
  for (uint32_t q = blockIdx.x * blockDim.x + threadIdx.x; q < quads; q += gridDim.x * blockDim.x) {
    const uint32_t i = 4 * q;
    const uint32_t h = i >= p.half ? 1u : 0u;
    const uint32_t j = i - h * p.half;
    uint32_t b[4];
#pragma unroll
    for (uint32_t e = 0; e < 4; ++e) b[e] = kivi_elem<T, BITS>(rec, p, h, j + e);
    if (sizeof(T) == 4) {
      reinterpret_cast<uint4 *>(out)[q] = make_uint4(b[0], b[1], b[2], b[3]);
    } else {
      reinterpret_cast<uint2 *>(out)[q] = make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
    }
  }
}

#define KIVI_ENTRY(NAME, T, BITS)                                                                              \
  extern "C" __global__ void NAME(const uint8_t *rec, uint32_t half, uint32_t row, uint32_t d, uint32_t heads,   \
                                  uint32_t group, uint32_t v_groups, uint32_t tq, uint32_t k_pairs,             \
                                  uint32_t codes_at, uint32_t code_bytes, uint32_t residual_at,                 \
                                  uint32_t residual_bytes, T *out) {                                            \
    dequant_kivi<T, BITS>(rec,                                                                                 \
                          Kivi{half, row, d, heads, group, v_groups, tq, k_pairs, codes_at, code_bytes,         \
                               residual_at, residual_bytes},                                                    \
                          out);                                                                                 \
  }

KIVI_ENTRY(dequant_kivi2_f32, float, 2)
KIVI_ENTRY(dequant_kivi2_bf16, __nv_bfloat16, 2)
KIVI_ENTRY(dequant_kivi2_f16, __half, 2)
KIVI_ENTRY(dequant_kivi4_f32, float, 4)
KIVI_ENTRY(dequant_kivi4_bf16, __nv_bfloat16, 4)
KIVI_ENTRY(dequant_kivi4_f16, __half, 4)
KIVI_ENTRY(dequant_kivi8_f32, float, 8)
KIVI_ENTRY(dequant_kivi8_bf16, __nv_bfloat16, 8)
KIVI_ENTRY(dequant_kivi8_f16, __half, 8)
