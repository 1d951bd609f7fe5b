// Dequantisation of stored 8-bit KV records on the device. Built to PTX by model/build.rs
// (feature `gpu`), launched by dequant.rs.
//
// A record (compression::codec::Scaled8) is `scales` f32 then 2 * half code bytes, K's then
// V's. Element i of half h decodes as
// value(code) * scale[base_h + (i / div_h) % mod_h + (i / odiv_h) * ostride_h],
// computed in f32 and rounded once to the output type: the formula of the CPU decoder
// (Scaled8::decode_into), so both give the same bits.
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
struct Map {
  uint32_t base, div, mod, odiv, ostride;
  __device__ __forceinline__ uint32_t index(uint32_t j) const { return base + (j / div) % mod + (j / odiv) * ostride; }
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
      x[e] = value<FP8>((c >> (8 * e)) & 0xFFu) * scales[m.index(j + e)];
    }
    out4[q] = Out4<T>::pack(x[0], x[1], x[2], x[3]);
  }
}

#define DEQUANT_ENTRY(NAME, T, FP8)                                                                            \
  extern "C" __global__ void NAME(const uint8_t *rec, uint32_t codes_at, uint32_t half, uint32_t kb,           \
                                  uint32_t kd, uint32_t km, uint32_t kod, uint32_t kos, uint32_t vb, uint32_t vd, \
                                  uint32_t vm, uint32_t vod, uint32_t vos, T *out) {                           \
    dequant8<T, FP8>(rec, codes_at, half, Map{kb, kd, km, kod, kos}, Map{vb, vd, vm, vod, vos}, out);         \
  }

DEQUANT_ENTRY(dequant_int8_f32, float, false)
DEQUANT_ENTRY(dequant_int8_bf16, __nv_bfloat16, false)
DEQUANT_ENTRY(dequant_int8_f16, __half, false)
DEQUANT_ENTRY(dequant_fp8_f32, float, true)
DEQUANT_ENTRY(dequant_fp8_bf16, __nv_bfloat16, true)
DEQUANT_ENTRY(dequant_fp8_f16, __half, true)
