// Fused attention with the exact position mask, for kvquilt's GPU path.
//
// out[q, h] = softmax_j( rope(q_pre[q, h], q_pos[q]) . rope(k_pre[j, h/G], k_pos[j]) / sqrt(D) ) v[j, h/G]
// over exactly the keys j with k_pos[j] <= q_pos[q]. Both position lists are strictly increasing;
// queries may be any subset of positions (a prefill, a decode step, blend's selected rows) and
// keys may have holes. K and Q arrive *before* RoPE and are rotated as they are loaded into
// shared memory (HF rotate_half: dimension i pairs with i + D/2; cos/sin tables are indexed by
// absolute position), so a cache never needs a rotated copy. Scores never leave registers.
//
// Layout of one CTA (128 threads, 4 warps): BM = 64 rows, each row a (query, head-in-group) pair
// of one KV head (GQA packing: row r is query q0 + r / G, head kv_head * G + r % G), so K/V
// tiles are loaded once for all G heads that read them; a warp owns 16 rows. Keys stream in
// tiles of BN = 64. Tensor cores: mma.sync m16n8k16 (bf16 or f16 in, f32 accumulate); the
// softmax is FlashAttention-2's online form in base 2. Split-KV (gridDim.z > 1) gives each split
// a contiguous range of key tiles and writes unnormalised partials that attn_combine merges:
// either one split count for the call, each tile's keys cut evenly, or (a per-tile plan, given
// as `tile_splits`) pieces of `piece` key tiles, so that a tile with many keys gets more splits
// than one with few and the longest CTA of a sparse call is not its last tile's share.
//
// A temperature on some keys' logits (APE's correction of a question's attention to chunks
// encoded apart, `ParallelContext` in model/src/parallel.rs): `corr` gives the query rows from
// `from` on, over the key slots [lo, hi), their logits multiplied by `factor` (1 / T) — what
// attending over a copy of the keys scaled by 1 / T computes (RoPE is linear), without the
// copy. `factor == 1` (or an empty range) is no correction. A captured CUDA graph passes the
// four values in device memory instead (`corr_dev`: from, lo, hi, the factor's f32 bits), so
// that one graph serves any correction, or none, written before each replay.
//
// Built to PTX by model/build.rs (feature `gpu`) and launched from model/src/kernels/flash.rs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define BM 64
#define BN 64
#define NTHREADS 128
#define NEG_INF __int_as_float(0xff800000)

// A temperature on the logits of query rows q >= from over key slots lo <= j < hi (see above).
struct KeyScale {
  int from, lo, hi;
  float factor;
  // whether a key tile [kbase, kbase + BN) holds a scaled key (uniform across the CTA)
  __device__ __forceinline__ bool touches(int kbase) const {
    return factor != 1.f && kbase < hi && kbase + BN > lo;
  }
  __device__ __forceinline__ bool scales(int row, int key) const {
    return row >= from && key >= lo && key < hi;
  }
  // the by-value correction, or the one in device memory where `dev` is given
  static __device__ __forceinline__ KeyScale of(int from, int lo, int hi, float factor,
                                                const uint32_t *dev) {
    if (dev == nullptr) return KeyScale{from, lo, hi, factor};
    return KeyScale{static_cast<int>(dev[0]), static_cast<int>(dev[1]),
                    static_cast<int>(dev[2]), __uint_as_float(dev[3])};
  }
};

template <typename T> struct Elem;

template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&u));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2 *>(&u));
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t *r, const void *p) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t *r, const void *p) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// 16-byte asynchronous global->shared copy of `src`, or 16 zero bytes when !valid (then
// nothing is read; `src` must still be a global address).
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
  uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_one() {
  asm volatile("cp.async.wait_group 1;\n" ::);
}

// Issues asynchronous copies of `rows` rows of D elements into smem (row stride D + 8);
// `src(r)` is the row's global pointer or nullptr for a padding row (zeros); `base` is any
// valid global address (the source operand of a zero-filling copy).
template <typename T, int D, typename Src>
__device__ __forceinline__ void copy_async(T *dst, int rows, Src src, const T *base) {
  for (int item = threadIdx.x; item < rows * (D / 8); item += NTHREADS) {
    const int r = item / (D / 8), c = item % (D / 8);
    const T *p = src(r);
    cp_async16(dst + r * (D + 8) + 8 * c, p != nullptr ? p + 8 * c : base, p != nullptr);
  }
}

// Number of entries of the strictly increasing `pos[0..len)` that are <= x. Strictly
// increasing integers give pos[i] >= pos[0] + i, so no entry past g = x - pos[0] is <= x, and
// when pos[g] == x the count is g + 1: keys without holes (a prompt's, a graphed cache's rows)
// take two dependent loads instead of a binary search's ~log2(len) (each an L2 round trip on
// the critical path of every CTA's start).
__device__ __forceinline__ int count_le(const uint32_t *pos, int len, uint32_t x) {
  if (len == 0) return 0;
  const uint32_t first = pos[0];
  if (x < first) return 0;
  const uint32_t g = x - first;
  if (g < static_cast<uint32_t>(len) && pos[g] == x) return static_cast<int>(g) + 1;
  int lo = 0, hi = g < static_cast<uint32_t>(len) ? static_cast<int>(g) + 1 : len;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (pos[mid] <= x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The split-KV count of a call: the host's plan (`split_cap`, from the CTA count, clamped to
// the key tiles over `min_tiles`) over the call's real keys — slots holding u32::MAX (past a
// captured graph's cache length) are not keys. Where every slot is a key this is the host's
// own count; over a cache of fixed capacity it is the count an eager call over the same keys
// launches, so both sum the same partials in the same order (bit-identical results). Never
// more than the `launched` splits. A graphed call appends its rows after the cache's, so its
// real keys are exactly those at or before its last query (`q_last`): counted by position,
// which count_le finds in two loads when the keys have no holes.
__device__ __forceinline__ int planned_splits(const uint32_t *k_pos, int t, uint32_t q_last,
                                              int split_cap, int min_tiles, int launched) {
  // every slot a key (an eager call): no search
  const int keys = t == 0 || k_pos[t - 1] != 0xffffffffu ? t : count_le(k_pos, t, q_last);
  const int tiles = (keys + BN - 1) / BN;
  return max(1, min(min(split_cap, max(tiles / min_tiles, 1)), launched));
}

// Rotates 8 pairs (x1[i], x2[i]) = (dim 8c+i, dim D/2+8c+i) by the angles whose cos/sin are
// given, in f32, rounding once: r1 = x1 cos - x2 sin, r2 = x2 cos + x1 sin.
template <typename T>
__device__ __forceinline__ void rotate8(const uint4 &x1, const uint4 &x2, const uint4 &c,
                                        const uint4 &s, uint4 &o1, uint4 &o2) {
  const uint32_t *a = &x1.x, *b = &x2.x, *cc = &c.x, *ss = &s.x;
  uint32_t *r1 = &o1.x, *r2 = &o2.x;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 fa = Elem<T>::unpack(a[i]), fb = Elem<T>::unpack(b[i]);
    float2 fc = Elem<T>::unpack(cc[i]), fs = Elem<T>::unpack(ss[i]);
    r1[i] = Elem<T>::pack(fa.x * fc.x - fb.x * fs.x, fa.y * fc.y - fb.y * fs.y);
    r2[i] = Elem<T>::pack(fb.x * fc.x + fa.x * fs.x, fb.y * fc.y + fa.y * fs.y);
  }
}

// The position key row `r` of KV head `kh` is rotated to: a pruned cache's first `head_rows`
// rows each by its own (row, KV head) position in `k_head_pos` ([rows, kvh]), the rest (and
// every row of a cache that is not pruned: head_rows 0) by `k_pos`, the mask's positions.
__device__ __forceinline__ uint32_t key_position(const uint32_t *k_pos,
                                                 const uint32_t *k_head_pos, int head_rows,
                                                 int kvh, int kh, int r) {
  return r < head_rows ? k_head_pos[static_cast<size_t>(r) * kvh + kh] : k_pos[r];
}

// Loads `rows` rows of D pre-RoPE elements into smem (row stride D + 8), rotated to `pos(row)`.
// `src(row)` returns the row's global pointer or nullptr for a padding row (written as zeros).
template <typename T, int D, typename Src, typename Pos>
__device__ __forceinline__ void load_rotated(T *dst, int rows, Src src, Pos pos, const T *cos,
                                             const T *sin) {
  constexpr int HALF = D / 2, CH = HALF / 8;
  for (int item = threadIdx.x; item < rows * CH; item += NTHREADS) {
    const int r = item / CH, c = item % CH;
    const T *p = src(r);
    uint4 o1 = make_uint4(0, 0, 0, 0), o2 = o1;
    if (p != nullptr) {
      const size_t at = static_cast<size_t>(pos(r)) * HALF + 8 * c;
      const uint4 x1 = *reinterpret_cast<const uint4 *>(p + 8 * c);
      const uint4 x2 = *reinterpret_cast<const uint4 *>(p + HALF + 8 * c);
      const uint4 cs = *reinterpret_cast<const uint4 *>(cos + at);
      const uint4 sn = *reinterpret_cast<const uint4 *>(sin + at);
      rotate8<T>(x1, x2, cs, sn, o1, o2);
    }
    *reinterpret_cast<uint4 *>(dst + r * (D + 8) + 8 * c) = o1;
    *reinterpret_cast<uint4 *>(dst + r * (D + 8) + HALF + 8 * c) = o2;
  }
}

// Stages a query tile into smem (row stride D + 8), rotated to the queries' positions: row r
// < G * qn is query q0 + r / G under head kh * G + r % G (GQA packing); the rest are zeros.
template <typename T, int D>
__device__ __forceinline__ void stage_q_tile(T *Qs, const T *q, int q_stride,
                                             const uint32_t *q_pos, int q0, int qn, int G, int kh,
                                             const T *cos, const T *sin) {
  load_rotated<T, D>(
      Qs, BM,
      [&](int r) -> const T * {
        return r < G * qn ? q + static_cast<size_t>(q0 + r / G) * q_stride + (kh * G + r % G) * D
                          : nullptr;
      },
      [&](int r) { return q_pos[q0 + min(r / G, qn - 1)]; }, cos, sin);
}

// This warp's 16 rows of a staged Q tile as mma A fragments, one per 16 dimensions.
template <typename T, int D>
__device__ __forceinline__ void q_fragments(uint32_t (&qf)[D / 16][4], const T *Qs, int warp,
                                            int lane) {
  constexpr int LD = D + 8;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    ldmatrix_x4(qf[ks], Qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + ks * 16 +
                            (lane >> 4) * 8);
}

// ROT_K: K arrives pre-RoPE and is rotated on load (synchronous loads; decode and other calls
// with few query tiles). Otherwise K was rotated once for the call (rope_rows) and K/V tiles
// stream with cp.async: K(kt+1) loads during tile kt's softmax and PV, V(kt+1) during tile
// kt+1's QK^T, in the same smem (no extra buffers).
template <typename T, int D, bool ROT_K>
__device__ __forceinline__ void attn_pos(const T *__restrict__ q, int q_stride,
                                         const T *__restrict__ k, int k_stride,
                                         const T *__restrict__ v, int v_stride,
                                         const uint32_t *__restrict__ q_pos,
                                         const uint32_t *__restrict__ k_pos,
                                         const uint32_t *__restrict__ k_head_pos, int head_rows,
                                         const T *__restrict__ cos, const T *__restrict__ sin,
                                         T *__restrict__ out, float *__restrict__ ws_o,
                                         float *__restrict__ ws_ml, float *__restrict__ lse,
                                         int n, int t, int H, int kvh, float scale_log2,
                                         int split_cap, int min_tiles,
                                         const uint32_t *__restrict__ tile_splits, int piece,
                                         KeyScale corr) {
  constexpr int LD = D + 8;  // smem row stride in elements: conflict-free ldmatrix
  const int G = H / kvh;
  const int QT = BM / G;  // queries per tile
  const int tile = gridDim.x - 1 - blockIdx.x;  // the tiles with the most keys start first
  // splits past the call's plan (or past this tile's own count, under a per-tile plan) have
  // no keys and nothing to write (the combine reads the planned splits only); uniform across
  // the CTA, so it may leave before any barrier
  const int split = blockIdx.z;
  const int splits = tile_splits != nullptr
                         ? static_cast<int>(tile_splits[tile])
                         : planned_splits(k_pos, t, q_pos[n - 1], split_cap, min_tiles,
                                          gridDim.z);
  if (split >= splits) return;
  __shared__ __align__(16) T Ks[BN * LD];
  __shared__ __align__(16) T Vs[BN * LD];
  __shared__ uint32_t kp_s[BN];
  __shared__ int bounds[2];
  T *Qs = Ks;  // Q is staged through the K buffer once, before the first key tile

  const int kh = blockIdx.y;
  const int q0 = tile * QT;
  const int qn = min(QT, n - q0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;

  // the two rows this thread accumulates: warp*16 + g and + 8
  int qi[2];
  uint32_t qp[2];
  const uint32_t last_pos = q_pos[q0 + qn - 1];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + g + rr * 8;
    qi[rr] = r < G * qn ? q0 + r / G : -1;
    qp[rr] = qi[rr] >= 0 ? q_pos[qi[rr]] : last_pos;
  }
  if (threadIdx.x == 0) {
    bounds[0] = count_le(k_pos, t, last_pos);   // keys any row of the tile can see
    bounds[1] = count_le(k_pos, t, q_pos[q0]);  // keys every row sees (no mask needed)
  }
  stage_q_tile<T, D>(Qs, q, q_stride, q_pos, q0, qn, G, kh, cos, sin);
  __syncthreads();
  uint32_t qf[D / 16][4];
  q_fragments<T, D>(qf, Qs, warp, lane);
  // Only keys below k_end are ever read: slots past it may hold keys no row of the tile sees,
  // or no key at all (u32::MAX positions of a captured graph's cache of fixed capacity, whose
  // rotation would index outside the tables); they load as zeros, masked.
  const int k_end = bounds[0], k_free = bounds[1];
  __syncthreads();  // Qs is overwritten by the first K tile

  const int n_tiles = (k_end + BN - 1) / BN;
  // a per-tile plan cuts every tile's keys into pieces of `piece` key tiles (the host counted
  // them: tile_splits[tile] = ceil(n_tiles / piece)); otherwise the call's split count cuts
  // each tile's keys evenly
  const int per = tile_splits != nullptr ? piece : (n_tiles + splits - 1) / splits;
  const int kt_begin = split * per, kt_end = min(n_tiles, kt_begin + per);

  auto k_row = [&](int kbase) {
    return [=](int j) -> const T * {
      return kbase + j < k_end ? k + static_cast<size_t>(kbase + j) * k_stride + kh * D : nullptr;
    };
  };
  auto v_row = [&](int kbase) {
    return [=](int j) -> const T * {
      return kbase + j < k_end ? v + static_cast<size_t>(kbase + j) * v_stride + kh * D : nullptr;
    };
  };
  auto issue_k = [&](int kt) {  // async K tile + its positions (padding: masked by index)
    const int kbase = kt * BN;
    copy_async<T, D>(Ks, BN, k_row(kbase), k);
    for (int j = threadIdx.x; j < BN; j += NTHREADS)
      kp_s[j] = kbase + j < k_end ? k_pos[kbase + j] : 0xffffffffu;
  };
  if (!ROT_K && kt_begin < kt_end) {
    issue_k(kt_begin);
    cp_async_commit();
    copy_async<T, D>(Vs, BN, v_row(kt_begin * BN), v);
    cp_async_commit();
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};

  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int kbase = kt * BN;
    if (ROT_K) {
      // a pruned cache's first `head_rows` keys are rotated by their own (row, KV head)
      // position; k_pos (the mask's positions) stands in for them otherwise
      load_rotated<T, D>(
          Ks, BN, k_row(kbase),
          [&](int j) { return key_position(k_pos, k_head_pos, head_rows, kvh, kh, kbase + j); },
          cos, sin);
      for (int item = threadIdx.x; item < BN * (D / 8); item += NTHREADS) {
        const int j = item / (D / 8), c = item % (D / 8);
        uint4 x = make_uint4(0, 0, 0, 0);  // padding keys must hold zeros, not NaN garbage
        if (kbase + j < k_end)
          x = *reinterpret_cast<const uint4 *>(v + static_cast<size_t>(kbase + j) * v_stride +
                                               kh * D + 8 * c);
        *reinterpret_cast<uint4 *>(Vs + j * LD + 8 * c) = x;
      }
      for (int j = threadIdx.x; j < BN; j += NTHREADS)
        kp_s[j] = kbase + j < k_end ? k_pos[kbase + j] : 0xffffffffu;
    } else {
      cp_async_wait_all_but_one();  // K(kt) has landed; V(kt) may be in flight
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x BN keys
    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ks += 2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, Ks + (nt * 8 + (lane & 7)) * LD + ks * 16 + (lane >> 3) * 8);
        Elem<T>::mma(s[nt], qf[ks], kb[0], kb[1]);
        Elem<T>::mma(s[nt], qf[ks + 1], kb[2], kb[3]);
      }
    }
    const bool need_mask = kbase + BN > k_free;
    const bool scaled = corr.touches(kbase);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        if (scaled && corr.scales(qi[e >> 1], kbase + nt * 8 + tq * 2 + (e & 1)))
          x *= corr.factor;
        if (need_mask && kp_s[nt * 8 + tq * 2 + (e & 1)] > qp[e >> 1]) x = NEG_INF;
        s[nt][e] = x;
      }
    if (!ROT_K) {
      __syncthreads();  // every warp is done with Ks and kp_s
      if (kt + 1 < kt_end) issue_k(kt + 1);
      cp_async_commit();
      cp_async_wait_all_but_one();  // V(kt) has landed; K(kt+1) may be in flight
      __syncthreads();
    }
    // online softmax, base 2
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = NEG_INF;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[rr], mx);
      const float m_use = m_new == NEG_INF ? 0.f : m_new;  // no (-inf) - (-inf)
      const float alpha = exp2f(m[rr] - m_use);
      l[rr] *= alpha;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        o[nd][2 * rr] *= alpha;
        o[nd][2 * rr + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        s[nt][2 * rr] = exp2f(s[nt][2 * rr] - m_use);
        s[nt][2 * rr + 1] = exp2f(s[nt][2 * rr + 1] - m_use);
        l[rr] += s[nt][2 * rr] + s[nt][2 * rr + 1];
      }
      m[rr] = m_new;
    }
    // O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 8; nd += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, Vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nd * 8 +
                                  (lane >> 4) * 8);
        Elem<T>::mma(o[nd], a, vb[0], vb[1]);
        Elem<T>::mma(o[nd + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with Vs (and, with ROT_K, Ks)
    if (!ROT_K) {
      if (kt + 1 < kt_end) copy_async<T, D>(Vs, BN, v_row((kt + 1) * BN), v);
      cp_async_commit();
    }
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float lt = l[rr];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    if (qi[rr] < 0) continue;
    const int r = warp * 16 + g + rr * 8;
    const int head = kh * G + r % G;
    if (splits == 1) {
      // log2-sum-exp2 of the row's scaled scores, for attn_colsum
      if (lse != nullptr && tq == 0) lse[static_cast<size_t>(qi[rr]) * H + head] = m[rr] + log2f(lt);
      const float inv = lt > 0.f ? 1.f / lt : 0.f;
      T *dst = out + (static_cast<size_t>(qi[rr]) * H + head) * D + tq * 2;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
        *reinterpret_cast<uint32_t *>(dst + nd * 8) =
            Elem<T>::pack(o[nd][2 * rr] * inv, o[nd][2 * rr + 1] * inv);
    } else {
      const size_t row = (static_cast<size_t>(split) * n + qi[rr]) * H + head;
      float *dst = ws_o + row * D + tq * 2;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        dst[nd * 8] = o[nd][2 * rr];
        dst[nd * 8 + 1] = o[nd][2 * rr + 1];
      }
      if (tq == 0) {
        ws_ml[row * 2] = m[rr];
        ws_ml[row * 2 + 1] = lt;
      }
    }
  }
}

// Rotates rows of pre-RoPE keys to their positions once per call: out[j, h] = rope(k[j, h],
// pos[j]); k rows have stride `stride`, out is [t, kvh, D] packed. A slot at position
// u32::MAX (a graphed cache's capacity past its length) is no key: written as zeros, its
// row never read (its rotation would index past the tables).
template <typename T, int D>
__device__ __forceinline__ void rope_rows(const T *__restrict__ k, int stride,
                                          const uint32_t *__restrict__ pos,
                                          const T *__restrict__ cos, const T *__restrict__ sin,
                                          T *__restrict__ out, int t, int kvh) {
  constexpr int HALF = D / 2, CH = HALF / 8;
  const size_t total = static_cast<size_t>(t) * kvh * CH;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int c = i % CH;
    const size_t jh = i / CH;
    const int h = jh % kvh;
    const size_t j = jh / kvh;
    const T *src = k + j * stride + h * D;
    T *dst = out + jh * D;
    if (pos[j] == 0xffffffffu) {
      *reinterpret_cast<uint4 *>(dst + 8 * c) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4 *>(dst + HALF + 8 * c) = make_uint4(0, 0, 0, 0);
      continue;
    }
    const size_t at = static_cast<size_t>(pos[j]) * HALF + 8 * c;
    uint4 o1, o2;
    rotate8<T>(*reinterpret_cast<const uint4 *>(src + 8 * c),
               *reinterpret_cast<const uint4 *>(src + HALF + 8 * c),
               *reinterpret_cast<const uint4 *>(cos + at), *reinterpret_cast<const uint4 *>(sin + at),
               o1, o2);
    *reinterpret_cast<uint4 *>(dst + 8 * c) = o1;
    *reinterpret_cast<uint4 *>(dst + HALF + 8 * c) = o2;
  }
}

// Merges split-KV partials: one block per (query, head) row, one thread per dimension. Merges
// the call's planned splits of the `launched` (planned_splits); with one, the attention kernel
// wrote the rows itself. The splits' (m, l) pairs are staged in shared memory by the block at
// once (up to COMBINE_STAGED splits), so that each thread's loop reads only its dimension's
// partials from global memory, unrolled so their loads overlap; the arithmetic and its order
// are the same either way.
#define COMBINE_STAGED 512
template <typename T>
__device__ __forceinline__ void attn_combine(const float *__restrict__ ws_o,
                                             const float *__restrict__ ws_ml, T *__restrict__ out,
                                             float *__restrict__ lse, int rows, int D,
                                             int launched, const uint32_t *__restrict__ k_pos,
                                             int t, int split_cap, int min_tiles,
                                             const uint32_t *__restrict__ tile_splits,
                                             int rows_per_tile,
                                             const uint32_t *__restrict__ q_pos, int heads) {
  __shared__ float ml[2 * COMBINE_STAGED];
  const int row = blockIdx.x, d = threadIdx.x;
  const int splits = tile_splits != nullptr
                         ? static_cast<int>(tile_splits[row / rows_per_tile])
                         : planned_splits(k_pos, t, q_pos[rows / heads - 1], split_cap,
                                          min_tiles, launched);
  if (splits == 1) return;
  const bool staged = splits <= COMBINE_STAGED;
  if (staged) {
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
      const size_t at = (static_cast<size_t>(s) * rows + row) * 2;
      ml[2 * s] = ws_ml[at];
      ml[2 * s + 1] = ws_ml[at + 1];
    }
  }
  __syncthreads();
  if (d >= D) return;
  auto m_of = [&](int s) {
    return staged ? ml[2 * s] : ws_ml[(static_cast<size_t>(s) * rows + row) * 2];
  };
  auto l_of = [&](int s) {
    return staged ? ml[2 * s + 1] : ws_ml[(static_cast<size_t>(s) * rows + row) * 2 + 1];
  };
  float mx = NEG_INF;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, m_of(s));
  float num = 0.f, den = 0.f;
  if (mx != NEG_INF) {
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
      const float w = exp2f(m_of(s) - mx);
      den += w * l_of(s);
      num += w * ws_o[(static_cast<size_t>(s) * rows + row) * D + d];
    }
  }
  out[static_cast<size_t>(row) * D + d] = Elem<T>::from_float(den > 0.f ? num / den : 0.f);
  if (lse != nullptr && d == 0) lse[row] = mx + log2f(den);
}

// Query-aware scoring (blend's suffix pass) needs, per key, the attention probability summed
// over the probed query rows and all heads. The attention kernel (or the split-KV combine)
// leaves each (row, head)'s log2-sum-exp2 of scaled scores in `lse`; attn_colsum, over the
// same pre-RoPE Q and K, adds exp2(s - lse) for each key into `acc`.
//
// One CTA per (key tile of BN keys, KV head), laid out as the attention kernel's with the roles
// turned: the K tile is loaded once (rotated), and the rows of its G query heads (the same GQA
// packing, BM rows per tile) stream past it. Scores come from the same tensor-core products as
// the attention's (so exp2(s - lse) over a row's keys adds up to 1 to f32 rounding); each
// thread sums its probabilities per key column over its rows, the warp over its 16 rows by
// shuffles, the CTA over its warps in shared memory, and one atomic add per key lands in `acc`
// (which accumulates: a caller wanting one call's sums passes zeros; SUM_KV_HEAD stores
// instead, below). Row tiles whose queries all precede the tile's first key see none of it
// and are skipped. Key slots at u32::MAX (a graphed cache's capacity past its length, always
// after its keys) are no keys: left untouched (SUM_KV_HEAD: zeros), and a CTA whose tile
// starts on one exits at once. Sized for short passes (a
// question's rows): every CTA streams all row tiles past its keys, so a long pass (thousands
// of rows) re-reads Q once per key tile.
//
// BY says how heads are summed: SUM_ALL (attn_colsum) adds every head's probability of a key
// into one column; SUM_KV_HEAD (attn_colsum_kv_heads) sums only the G query heads of the CTA's
// KV head, `acc` being [kvh, t - key_from] (one CTA per (key tile, KV head), so the group is
// summed in registers and shared memory with no extra launch: a decode pool ranks per KV
// head). Each entry of that row has one writer, this CTA, so SUM_KV_HEAD *stores* every entry
// of its tile's columns (0 for a slot that is no key, or a tile past the keys) instead of
// adding: `acc` needs no zeroing launch before it.
//
// SUM_QUERY_HEAD (attn_colsum_heads): each probability goes to its own query head's row instead,
// `acc` being [H, t - key_from] (head kh * G + r % G of a tile row r): added into a shared-memory row
// per head of the CTA's KV head (G <= 8, checked by the host), then one atomic add per
// (head, key) into `acc`.
//
// Over a pruned cache (a decode pool's probe), the first `head_rows` keys are rotated by their
// own (row, KV head) position `k_head_pos`, as in the attention kernel; `k_pos` (the mask's
// positions) stands in for them otherwise and is what the causal test reads.
//
// Only keys `key_from..t` are summed (a decode pool ranks only its own rows, the cache's
// last few): key tiles start at `key_from`, and `acc` is [t - key_from] (per head:
// [H, t - key_from]), key j at column j - key_from. The grid covers those keys alone.
#define SUM_ALL 0
#define SUM_QUERY_HEAD 1
#define SUM_KV_HEAD 2
template <typename T, int D, int BY>
__device__ __forceinline__ void attn_colsum(const T *__restrict__ q, int q_stride,
                                            const T *__restrict__ k, int k_stride,
                                            const uint32_t *__restrict__ q_pos,
                                            const uint32_t *__restrict__ k_pos,
                                            const uint32_t *__restrict__ k_head_pos,
                                            int head_rows,
                                            const T *__restrict__ cos, const T *__restrict__ sin,
                                            const float *__restrict__ lse, float *__restrict__ acc,
                                            int n, int t, int key_from, int H, int kvh,
                                            float scale_log2, KeyScale corr) {
  constexpr int LD = D + 8;  // smem row stride in elements: conflict-free ldmatrix
  constexpr bool PER_HEAD = BY == SUM_QUERY_HEAD;
  const int G = H / kvh;
  const int QT = BM / G;  // queries per row tile
  const int kbase = key_from + blockIdx.x * BN, kh = blockIdx.y;
  const int width = t - key_from;  // acc's columns
  if (k_pos[kbase] == 0xffffffffu) {  // uniform: the whole tile is past the keys
    if (BY == SUM_KV_HEAD)
      for (int j = threadIdx.x; j < min(BN, t - kbase); j += NTHREADS)
        acc[static_cast<size_t>(kh) * width + (kbase - key_from) + j] = 0.f;
    return;
  }
  __shared__ __align__(16) T Ks[BN * LD];
  __shared__ __align__(16) T Qs[BM * LD];
  __shared__ uint32_t kp_s[BN];
  __shared__ float red[NTHREADS / 32][BN];
  __shared__ float heads_s[PER_HEAD ? 8 : 1][BN];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  if (PER_HEAD)
    for (int i = threadIdx.x; i < G * BN; i += NTHREADS) heads_s[i / BN][i % BN] = 0.f;
  const int kn = min(BN, t - kbase);
  const bool scaled = corr.touches(kbase);
  auto is_key = [&](int j) { return j < kn && k_pos[kbase + j] != 0xffffffffu; };
  for (int j = threadIdx.x; j < BN; j += NTHREADS)
    kp_s[j] = is_key(j) ? k_pos[kbase + j] : 0xffffffffu;
  load_rotated<T, D>(
      Ks, BN,
      [&](int j) -> const T * {
        return is_key(j) ? k + static_cast<size_t>(kbase + j) * k_stride + kh * D : nullptr;
      },
      [&](int j) { return key_position(k_pos, k_head_pos, head_rows, kvh, kh, kbase + j); },
      cos, sin);

  float col[BN / 8][2];  // this thread's sums for key columns nt * 8 + tq * 2 + {0, 1}
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) col[nt][0] = col[nt][1] = 0.f;
  // queries before the tile's first key see none of it
  const uint32_t first = k_pos[kbase];
  const int before = first == 0 ? 0 : count_le(q_pos, n, first - 1);
  const int q_tiles = (n + QT - 1) / QT;
  for (int qt = before / QT; qt < q_tiles; ++qt) {
    const int q0 = qt * QT, qn = min(QT, n - q0);
    __syncthreads();  // the previous tile's Qs reads are done (first time: Ks, kp_s written)
    stage_q_tile<T, D>(Qs, q, q_stride, q_pos, q0, qn, G, kh, cos, sin);
    __syncthreads();
    uint32_t qf[D / 16][4];
    q_fragments<T, D>(qf, Qs, warp, lane);
    // this thread's two rows: warp*16 + g and + 8
    bool live[2];
    uint32_t qp[2];
    float ls[2];
    int qi[2], qh[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = warp * 16 + g + rr * 8;
      live[rr] = r < G * qn;
      qi[rr] = q0 + (live[rr] ? r / G : 0);
      qh[rr] = r % G;
      qp[rr] = live[rr] ? q_pos[qi[rr]] : 0;
      ls[rr] = live[rr] ? lse[static_cast<size_t>(qi[rr]) * H + kh * G + r % G] : 0.f;
    }
    // S = Q K^T for this warp's 16 rows x BN keys (the attention kernel's products)
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < D / 16; ks += 2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, Ks + (nt * 8 + (lane & 7)) * LD + ks * 16 + (lane >> 3) * 8);
        Elem<T>::mma(s, qf[ks], kb[0], kb[1]);
        Elem<T>::mma(s, qf[ks + 1], kb[2], kb[3]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        const int j = nt * 8 + tq * 2 + (e & 1);
        if (live[rr] && kp_s[j] <= qp[rr]) {
          float x = s[e] * scale_log2;
          if (scaled && corr.scales(qi[rr], kbase + j)) x *= corr.factor;
          if (PER_HEAD)
            atomicAdd(&heads_s[qh[rr]][j], exp2f(x - ls[rr]));
          else
            col[nt][e & 1] += exp2f(x - ls[rr]);
        }
      }
    }
  }
  if (PER_HEAD) {
    __syncthreads();  // every row tile's adds are in
    for (int i = threadIdx.x; i < G * BN; i += NTHREADS) {
      const int hg = i / BN, j = i % BN;
      if (kp_s[j] == 0xffffffffu) continue;
      atomicAdd(acc + static_cast<size_t>(kh * G + hg) * width + (kbase - key_from) + j,
                heads_s[hg][j]);
    }
    return;
  }
  // the warp's 16 rows: lanes of one tq hold the same columns
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float v = col[nt][c];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (g == 0) red[warp][nt * 8 + tq * 2 + c] = v;
    }
  __syncthreads();
  for (int j = threadIdx.x; j < BN; j += NTHREADS) {
    if (BY == SUM_KV_HEAD && j < kn && kp_s[j] == 0xffffffffu)
      acc[static_cast<size_t>(kh) * width + (kbase - key_from) + j] = 0.f;
    if (kp_s[j] == 0xffffffffu) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < NTHREADS / 32; ++w) v += red[w][j];
    if (BY == SUM_KV_HEAD)  // this KV head's row, written by this CTA alone
      acc[static_cast<size_t>(kh) * width + (kbase - key_from) + j] = v;
    else  // the one row every KV head's CTAs add into
      atomicAdd(acc + (kbase - key_from) + j, v);
  }
}

#define COLSUM_ENTRY(NAME, BY, T, SUF, D)                                                        \
  extern "C" __global__ void __launch_bounds__(NTHREADS) NAME##_##SUF##_d##D(                    \
      const T *q, int q_stride, const T *k, int k_stride, const uint32_t *q_pos,                 \
      const uint32_t *k_pos, const uint32_t *k_head_pos, int head_rows, const T *cos,            \
      const T *sin, const float *lse, float *acc, int n, int t, int key_from, int H, int kvh,    \
      float scale_log2, int corr_from, int corr_lo, int corr_hi, float corr_factor,              \
      const uint32_t *corr_dev) {                                                                \
    attn_colsum<T, D, BY>(q, q_stride, k, k_stride, q_pos, k_pos, k_head_pos, head_rows,         \
                          cos, sin, lse, acc, n, t, key_from, H, kvh, scale_log2,                \
                          KeyScale::of(corr_from, corr_lo, corr_hi, corr_factor, corr_dev));     \
  }

COLSUM_ENTRY(attn_colsum, SUM_ALL, __nv_bfloat16, bf16, 64)
COLSUM_ENTRY(attn_colsum, SUM_ALL, __nv_bfloat16, bf16, 128)
COLSUM_ENTRY(attn_colsum, SUM_ALL, __half, f16, 64)
COLSUM_ENTRY(attn_colsum, SUM_ALL, __half, f16, 128)
COLSUM_ENTRY(attn_colsum_heads, SUM_QUERY_HEAD, __nv_bfloat16, bf16, 64)
COLSUM_ENTRY(attn_colsum_heads, SUM_QUERY_HEAD, __nv_bfloat16, bf16, 128)
COLSUM_ENTRY(attn_colsum_heads, SUM_QUERY_HEAD, __half, f16, 64)
COLSUM_ENTRY(attn_colsum_heads, SUM_QUERY_HEAD, __half, f16, 128)
COLSUM_ENTRY(attn_colsum_kv_heads, SUM_KV_HEAD, __nv_bfloat16, bf16, 64)
COLSUM_ENTRY(attn_colsum_kv_heads, SUM_KV_HEAD, __nv_bfloat16, bf16, 128)
COLSUM_ENTRY(attn_colsum_kv_heads, SUM_KV_HEAD, __half, f16, 64)
COLSUM_ENTRY(attn_colsum_kv_heads, SUM_KV_HEAD, __half, f16, 128)

#define ATTN_ENTRY(NAME, T, D, ROT_K)                                                            \
  extern "C" __global__ void __launch_bounds__(NTHREADS) NAME(                                   \
      const T *q, int q_stride, const T *k, int k_stride, const T *v, int v_stride,              \
      const uint32_t *q_pos, const uint32_t *k_pos, const uint32_t *k_head_pos, int head_rows,   \
      const T *cos, const T *sin, T *out, float *ws_o, float *ws_ml, float *lse, int n, int t,   \
      int H, int kvh, float scale_log2, int split_cap, int min_tiles,                            \
      const uint32_t *tile_splits, int piece, int corr_from, int corr_lo, int corr_hi,          \
      float corr_factor, const uint32_t *corr_dev) {                                             \
    attn_pos<T, D, ROT_K>(q, q_stride, k, k_stride, v, v_stride, q_pos, k_pos, k_head_pos,       \
                          head_rows, cos, sin, out, ws_o, ws_ml, lse, n, t, H, kvh, scale_log2,  \
                          split_cap, min_tiles, tile_splits, piece,                              \
                          KeyScale::of(corr_from, corr_lo, corr_hi, corr_factor, corr_dev));     \
  }

ATTN_ENTRY(attn_pos_bf16_d64, __nv_bfloat16, 64, true)
ATTN_ENTRY(attn_pos_bf16_d128, __nv_bfloat16, 128, true)
ATTN_ENTRY(attn_pos_f16_d64, __half, 64, true)
ATTN_ENTRY(attn_pos_f16_d128, __half, 128, true)
ATTN_ENTRY(attn_rot_bf16_d64, __nv_bfloat16, 64, false)
ATTN_ENTRY(attn_rot_bf16_d128, __nv_bfloat16, 128, false)
ATTN_ENTRY(attn_rot_f16_d64, __half, 64, false)
ATTN_ENTRY(attn_rot_f16_d128, __half, 128, false)

#define ROPE_ENTRY(NAME, T, D)                                                                   \
  extern "C" __global__ void NAME(const T *k, int stride, const uint32_t *pos, const T *cos,     \
                                  const T *sin, T *out, int t, int kvh) {                        \
    rope_rows<T, D>(k, stride, pos, cos, sin, out, t, kvh);                                      \
  }

ROPE_ENTRY(rope_rows_bf16_d64, __nv_bfloat16, 64)
ROPE_ENTRY(rope_rows_bf16_d128, __nv_bfloat16, 128)
ROPE_ENTRY(rope_rows_f16_d64, __half, 64)
ROPE_ENTRY(rope_rows_f16_d128, __half, 128)

extern "C" __global__ void attn_combine_bf16(const float *ws_o, const float *ws_ml,
                                             __nv_bfloat16 *out, float *lse, int rows, int D,
                                             int launched, const uint32_t *k_pos, int t,
                                             int split_cap, int min_tiles,
                                             const uint32_t *tile_splits, int rows_per_tile,
                                             const uint32_t *q_pos, int heads) {
  attn_combine<__nv_bfloat16>(ws_o, ws_ml, out, lse, rows, D, launched, k_pos, t, split_cap,
                              min_tiles, tile_splits, rows_per_tile, q_pos, heads);
}

extern "C" __global__ void attn_combine_f16(const float *ws_o, const float *ws_ml, __half *out,
                                            float *lse, int rows, int D, int launched,
                                            const uint32_t *k_pos, int t, int split_cap,
                                            int min_tiles, const uint32_t *tile_splits,
                                            int rows_per_tile, const uint32_t *q_pos,
                                            int heads) {
  attn_combine<__half>(ws_o, ws_ml, out, lse, rows, D, launched, k_pos, t, split_cap,
                       min_tiles, tile_splits, rows_per_tile, q_pos, heads);
}
