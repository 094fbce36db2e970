// Tiled crossbar GEMM with the per-tile ADC inside its K loop (nvmpriv native fast path).
//
//   C[i, j] = scale * sum_t ADC(sum_{k < ts} A[t, i, k] * B[t, k, j]),
//   ADC(s) = round_half_even(clamp(s, -qmax, qmax))
//
// One tile row t of the crossbar holds crossbar rows t*ts .. t*ts+ts-1 (zero-padded), so every
// partial sum is accumulated in registers over exactly one tile, converted, and added to the
// output accumulator: the partial sums never reach memory. The eager torch path computes the
// same codes (clamp-then-round equals round-then-clamp for an integer qmax; the codes are
// integers, so their float sum is exact and its order does not matter).
//
// Portable GCC/Clang vector extensions: compiled with -march=native they become AVX-512, AVX2
// or NEON code. No -ffast-math: the rounding below relies on IEEE round-to-nearest-even.
// Loaded with ctypes by nvmpriv/native/library.py (extern "C" ABI, no Python or torch headers).

#include <cstdint>
#include <cstring>
#include <cstdlib>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

constexpr int MR = 6;               // output rows per micro-tile
constexpr int NV = 4;               // vectors per micro-tile row
constexpr int NR = kLanes * NV;     // output columns per micro-tile (= packed panel width)
// 1.5 * 2^23: adding and subtracting it rounds |v| <= 2^22 to the nearest integer, ties to even
constexpr float kMagic = 12582912.0f;

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

inline vf splat(float x) { return vf{} + x; }

// Output addressing: element (i, j) at base + i*ldc + (j / block)*ld_block + j % block, so a
// convolution writes its [channels, batch * positions] result straight into NCHW.
struct Out {
  float* base;
  int64_t ldc, block, ld_block;
  void store(int i, int64_t j, const float* row, int n) const {
    float* r = base + i * ldc;
    for (int q = 0; q < n;) {
      const int64_t off = j % block;
      const int run = static_cast<int>(n - q < block - off ? n - q : block - off);
      std::memcpy(r + (j / block) * ld_block + off, row + q, run * sizeof(float));
      q += run;
      j += run;
    }
  }
};

template <int R>
inline __attribute__((always_inline)) void micro_tile(
    const float* a, int64_t sa_t, int64_t sa_i, const float* bp, int n_r, int ts, const Out& c,
    int64_t j0, int nc, float qmax, float scale, const uint8_t* check, float thr,
    uint8_t* reach) {
  vf acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
  const vf hi = splat(qmax), lo = splat(-qmax), magic = splat(kMagic);
  for (int t = 0; t < n_r; ++t) {
    vf s[R][NV];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NV; ++j) s[i][j] = vf{};
    const float* bt = bp + static_cast<int64_t>(t) * ts * NR;
    const float* at = a + t * sa_t;
    for (int k = 0; k < ts; ++k) {
      vf w[NV];
      for (int j = 0; j < NV; ++j) w[j] = load(bt + k * NR + j * kLanes);
      for (int i = 0; i < R; ++i) {
        const float x = at[i * sa_i + k];
        for (int j = 0; j < NV; ++j) s[i][j] += x * w[j];
      }
    }
    if (check != nullptr && check[t] && !reach[t]) {
      vf m = vf{};
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < NV; ++j) {
          const vf v = s[i][j];
          const vf av = v < 0 ? -v : v;
          m = av > m ? av : m;
        }
      for (int l = 0; l < kLanes; ++l)
        if (m[l] >= thr) reach[t] = 1;
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NV; ++j) {
        vf v = s[i][j];
        v = v > hi ? hi : v;
        v = v < lo ? lo : v;
        acc[i][j] += (v + magic) - magic;
      }
  }
  for (int i = 0; i < R; ++i) {
    float row[NR];
    for (int j = 0; j < NV; ++j) {
      const vf v = acc[i][j] * scale;
      std::memcpy(row + j * kLanes, &v, sizeof(vf));
    }
    c.store(i, j0, row, nc);
  }
}

void panel_rows(const float* a, int64_t sa_t, int64_t sa_i, int m_rows, const float* bp,
                int n_r, int ts, const Out& c, int64_t j0, int nc, float qmax, float scale,
                const uint8_t* check, float thr, uint8_t* reach) {
  for (int i0 = 0; i0 < m_rows; i0 += MR) {
    const float* ai = a + i0 * sa_i;
    const Out ci{c.base + i0 * c.ldc, c.ldc, c.block, c.ld_block};
    switch (m_rows - i0 >= MR ? MR : m_rows - i0) {
      case 6: micro_tile<6>(ai, sa_t, sa_i, bp, n_r, ts, ci, j0, nc, qmax, scale, check, thr, reach); break;
      case 5: micro_tile<5>(ai, sa_t, sa_i, bp, n_r, ts, ci, j0, nc, qmax, scale, check, thr, reach); break;
      case 4: micro_tile<4>(ai, sa_t, sa_i, bp, n_r, ts, ci, j0, nc, qmax, scale, check, thr, reach); break;
      case 3: micro_tile<3>(ai, sa_t, sa_i, bp, n_r, ts, ci, j0, nc, qmax, scale, check, thr, reach); break;
      case 2: micro_tile<2>(ai, sa_t, sa_i, bp, n_r, ts, ci, j0, nc, qmax, scale, check, thr, reach); break;
      default: micro_tile<1>(ai, sa_t, sa_i, bp, n_r, ts, ci, j0, nc, qmax, scale, check, thr, reach); break;
    }
  }
}

void pack_panel(const float* b, int64_t sb_t, int64_t sb_k, int n_r, int ts, int c0, int nc,
                float* dst) {
  for (int t = 0; t < n_r; ++t)
    for (int k = 0; k < ts; ++k) {
      const float* src = b + t * sb_t + k * sb_k + c0;
      float* d = dst + (static_cast<int64_t>(t) * ts + k) * NR;
      std::memcpy(d, src, nc * sizeof(float));
      if (nc < NR) std::memset(d + nc, 0, (NR - nc) * sizeof(float));
    }
}

// Convolution input gathered straight into a packed panel (im2col without the unfolded matrix).
// geo: strides of the padded NCHW input (b, c, h, w; elements), first channel of the group,
// kh, kw, stride h, stride w, dilation h, dilation w, output h, output w, real rows k.
void gather_conv_panel(const float* x, const int64_t* geo, int n_rows, int64_t j0, int nc,
                       float* dst) {
  const int64_t s_b = geo[0], s_c = geo[1], s_h = geo[2], s_w = geo[3], c0 = geo[4];
  const int64_t kh = geo[5], kw = geo[6], sh = geo[7], sw = geo[8], dh = geo[9], dw = geo[10];
  const int64_t h_out = geo[11], w_out = geo[12], k = geo[13];
  int64_t off[NR];
  for (int q = 0; q < nc; ++q) {
    const int64_t pos = j0 + q, l = pos % (h_out * w_out);
    off[q] = (pos / (h_out * w_out)) * s_b + (l / w_out) * sh * s_h + (l % w_out) * sw * s_w;
  }
  // runs of positions whose inputs are adjacent in memory (stride-1 image rows) are copied
  int run_start[NR + 1];
  int n_runs = 0;
  for (int q = 0; q < nc; ++q)
    if (q == 0 || off[q] != off[q - 1] + 1) run_start[n_runs++] = q;
  run_start[n_runs] = nc;
  for (int r = 0; r < n_rows; ++r) {
    float* d = dst + static_cast<int64_t>(r) * NR;
    if (r >= k) {
      std::memset(d, 0, NR * sizeof(float));
      continue;
    }
    const int64_t c = r / (kh * kw), i = (r / kw) % kh, j = r % kw;
    const float* xr = x + (c0 + c) * s_c + i * dh * s_h + j * dw * s_w;
    for (int u = 0; u < n_runs; ++u) {
      const int q0 = run_start[u], len = run_start[u + 1] - q0;
      if (len >= 8) {
        std::memcpy(d + q0, xr + off[q0], len * sizeof(float));
      } else {
        for (int q = q0; q < q0 + len; ++q) d[q] = xr[off[q]];
      }
    }
    for (int q = nc; q < NR; ++q) d[q] = 0.f;
  }
}

inline int panel_cols(int n_cols, int p) {
  const int nc = n_cols - p * NR;
  return nc > NR ? NR : nc;
}

}  // namespace

extern "C" {

// Interface version checked by the loader; bump with any signature change.
int nvmpriv_adc_abi(void) { return 5; }

// Packed panel width (columns).
int nvmpriv_adc_panel_width(void) { return NR; }

// Whether panels are shared out over OpenMP threads inside nvmpriv_adc_gemm. Built with
// -fopenmp, the library binds to the libgomp that torch has already loaded (same SONAME), so
// the kernel and torch's own operators share one thread pool instead of competing for cores.
int nvmpriv_adc_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Packs B (element [t, k, j] at b[t*sb_t + k*sb_k + j]) into out[p][t][k][NR] for all
// ceil(n_cols / NR) panels, zero-padding the columns past n_cols.
void nvmpriv_adc_pack(const float* b, int64_t sb_t, int64_t sb_k, int n_r, int ts, int n_cols,
                      float* out) {
  const int n_p = (n_cols + NR - 1) / NR;
  for (int p = 0; p < n_p; ++p)
    pack_panel(b, sb_t, sb_k, n_r, ts, p * NR, panel_cols(n_cols, p),
               out + static_cast<int64_t>(p) * n_r * ts * NR);
}

// DAC codes d = clamp(round(x / step), -qmax, qmax) (ties to even; 1 <= qmax <= 2^22), or a
// plain copy d = x when step <= 0, for an [n0, n1, n2] block: x element (i, j, k) at
// x[i*sx0 + j*sx1 + k], d element at d[i*sd0 + j*sd1 + k]. Same float32 operations as the
// export's Div, Round and Clip (clamping first rounds to the same integer for integer qmax).
void nvmpriv_dac_codes(const float* x, int64_t n0, int64_t n1, int64_t n2, int64_t sx0,
                       int64_t sx1, float* d, int64_t sd0, int64_t sd1, float step, float qmax,
                       int n_threads) {
  const int64_t rows = n0 * n1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(n_threads > 0 ? n_threads : 1) \
    if (rows * n2 >= (1 << 16))
#else
  (void)n_threads;
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / n1, j = r % n1;
    const float* src = x + i * sx0 + j * sx1;
    float* dst = d + i * sd0 + j * sd1;
    if (step <= 0.0f) {
      for (int64_t k = 0; k < n2; ++k) dst[k] = src[k];
      continue;
    }
    for (int64_t k = 0; k < n2; ++k) {
      float v = src[k] / step;
      v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
      dst[k] = (v + kMagic) - kMagic;
    }
  }
}

// Column panels [p0, p1) of C = scale * sum_t ADC(A_t @ B_t), ADC(s) = round(clamp(s)).
//   A: element [t, i, k] at a[t*sa_t + i*sa_i + k], i < m_rows, k < ts.
//   B: packed by nvmpriv_adc_pack when `packed`; else, with `conv` (see gather_conv_panel),
//      gathered from the padded NCHW input b of a convolution; else element [t, k, j] at
//      b[t*sb_t + k*sb_k + j]. Unpacked panels are packed into a private buffer before use.
//   C: element (i, j) at c[i*ldc + (j / block)*ld_block + j % block] (block >= 1).
//   check (may be NULL): per tile row, whether to record in reach[thread * n_r + t] that a
//   partial sum's magnitude reached thr before conversion; reach holds n_threads * n_r bytes.
// Panels are shared over n_threads OpenMP threads where built with OpenMP. Returns 0, or -1
// when a packing buffer could not be allocated.
int nvmpriv_adc_gemm(const float* a, int64_t sa_t, int64_t sa_i, int m_rows, const float* b,
                     int64_t sb_t, int64_t sb_k, int packed, const int64_t* conv, int n_r,
                     int ts, int n_cols,
                     int p0, int p1, float* c, int64_t ldc, int64_t block, int64_t ld_block,
                     float qmax, float scale, const uint8_t* check, float thr, uint8_t* reach,
                     int n_threads) {
  const int64_t panel = static_cast<int64_t>(n_r) * ts * NR;
  const Out out{c, ldc, block, ld_block};
  int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads > 0 ? n_threads : 1) reduction(| : failed)
#endif
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
    (void)n_threads;
#endif
    // every thread must reach the work-sharing loop, so a failed allocation only skips panels
    float* buf = packed ? nullptr
                        : static_cast<float*>(std::aligned_alloc(64, panel * sizeof(float)));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int p = p0; p < p1; ++p) {
      const int nc = panel_cols(n_cols, p);
      const float* bp = buf;
      if (packed) {
        bp = b + p * panel;
      } else {
        if (buf == nullptr) {
          failed = 1;
          continue;
        }
        if (conv != nullptr) {
          gather_conv_panel(b, conv, n_r * ts, static_cast<int64_t>(p) * NR, nc, buf);
        } else {
          pack_panel(b, sb_t, sb_k, n_r, ts, p * NR, nc, buf);
        }
        bp = buf;
      }
      panel_rows(a, sa_t, sa_i, m_rows, bp, n_r, ts, out, static_cast<int64_t>(p) * NR, nc, qmax,
                 scale, check, thr, reach + static_cast<int64_t>(tid) * n_r);
    }
    std::free(buf);
  }
  return failed ? -1 : 0;
}

}  // extern "C"
