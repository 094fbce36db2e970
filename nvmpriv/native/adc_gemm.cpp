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

#include <array>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <utility>
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
};

// Where one panel's columns go in a row of C: runs of columns contiguous there (a convolution's
// positions break at image boundaries), worked out once per panel rather than once per row.
struct PanelOut {
  int n_runs = 0;
  int start[NR + 1];  // first panel column of each run; start[n_runs] = nc
  int64_t dst[NR];    // offset within a row of C of each run's first column
  PanelOut(const Out& c, int64_t j0, int nc) {
    int64_t blk = j0 / c.block, off = j0 % c.block;
    for (int q = 0; q < nc;) {
      const int run = static_cast<int>(nc - q < c.block - off ? nc - q : c.block - off);
      start[n_runs] = q;
      dst[n_runs++] = blk * c.ld_block + off;
      q += run;
      off = 0;
      ++blk;
    }
    start[n_runs] = nc;
  }
};

// What happens to a micro-tile's summed codes before they are stored:
// v = scale * codes (+ bias) (+ res) (then max(v, 0) with relu), the order of the export's Mul
// and Add, a folded BatchNormalization (per-row scale and bias), a residual Add and Relu.
struct Epilogue {
  float qmax, scale;
  const float* row_bias;  // per row of C from the micro-tile's first row, or nullptr
  const float* col_bias;  // the panel's NR columns (zero-padded), or nullptr
  bool relu;
  const uint8_t* check;
  float thr;
  uint8_t* reach;
  // instead of scale: per row of C from the micro-tile's first row (direct path: the channel
  // panel's NR lanes, zero-padded), or nullptr
  const float* row_scale = nullptr;
  // added before the ReLU: an array addressed as C, at the micro-tile's first row, or nullptr
  const float* res = nullptr;
};

// A row of computed values (before the ReLU when there is a residual) stored into its runs in
// C, with the residual added and the ReLU applied there when there is one.
inline void store_row(const float* row, float* ci, const float* ri, const PanelOut& po,
                      bool relu) {
  if (ri == nullptr) {
    for (int u = 0; u < po.n_runs; ++u)
      std::memcpy(ci + po.dst[u], row + po.start[u],
                  (po.start[u + 1] - po.start[u]) * sizeof(float));
    return;
  }
  for (int u = 0; u < po.n_runs; ++u) {
    const float* src = row + po.start[u];
    const float* r = ri + po.dst[u];
    float* d = ci + po.dst[u];
    const int n = po.start[u + 1] - po.start[u];
    for (int q = 0; q < n; ++q) {
      const float v = src[q] + r[q];
      d[q] = relu && v < 0 ? 0.f : v;
    }
  }
}

// One tile row's partial sums s converted by the ADC and added to the running codes acc:
// acc += round_half_even(clamp(s, -qmax, qmax)).
template <int R, int NVU>
inline __attribute__((always_inline)) void add_codes(const vf (&s)[R][NVU], vf (&acc)[R][NVU],
                                                     float qmax) {
  const vf hi = splat(qmax), lo = splat(-qmax), magic = splat(kMagic);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NVU; ++j) {
      vf v = s[i][j];
      v = v > hi ? hi : v;
      v = v < lo ? lo : v;
      acc[i][j] += (v + magic) - magic;
    }
}

// R rows by NVU vectors of one panel (NVU < NV for a narrow last panel: the padding columns
// are not computed).
template <int R, int NVU>
void micro_tile(const float* a, int64_t sa_t, int64_t sa_i, const float* bp, int n_r, int ts,
                int k_last, float* c, int64_t ldc, const PanelOut& po, const Epilogue& e) {
  vf acc[R][NVU];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NVU; ++j) acc[i][j] = vf{};
  for (int t = 0; t < n_r; ++t) {
    vf s[R][NVU];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NVU; ++j) s[i][j] = vf{};
    const float* bt = bp + static_cast<int64_t>(t) * ts * NR;
    const float* at = a + t * sa_t;
    const int kt = t == n_r - 1 ? k_last : ts;  // the last tile row's zero rows are skipped
    for (int k = 0; k < kt; ++k) {
      vf w[NVU];
      for (int j = 0; j < NVU; ++j) w[j] = load(bt + k * NR + j * kLanes);
      for (int i = 0; i < R; ++i) {
        const float x = at[i * sa_i + k];
        for (int j = 0; j < NVU; ++j) s[i][j] += x * w[j];
      }
    }
    if (e.check != nullptr && e.check[t] && !e.reach[t]) {
      vf m = vf{};
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < NVU; ++j) {
          const vf v = s[i][j];
          const vf av = v < 0 ? -v : v;
          m = av > m ? av : m;
        }
      for (int l = 0; l < kLanes; ++l)
        if (m[l] >= e.thr) e.reach[t] = 1;
    }
    add_codes<R, NVU>(s, acc, e.qmax);
  }
  const bool relu_now = e.relu && e.res == nullptr;  // else after the residual, in store_row
  for (int i = 0; i < R; ++i) {
    float row[NR];
    const float sc = e.row_scale != nullptr ? e.row_scale[i] : e.scale;
    for (int j = 0; j < NVU; ++j) {
      vf v = acc[i][j] * sc;
      if (e.col_bias != nullptr) v += load(e.col_bias + j * kLanes);
      if (e.row_bias != nullptr) v += e.row_bias[i];
      if (relu_now) v = v < 0 ? vf{} : v;
      std::memcpy(row + j * kLanes, &v, sizeof(vf));
    }
    store_row(row, c + i * ldc, e.res != nullptr ? e.res + i * ldc : nullptr, po, e.relu);
  }
}

typedef void (*MicroTile)(const float*, int64_t, int64_t, const float*, int, int, int, float*,
                          int64_t, const PanelOut&, const Epilogue&);

// Table of Kind::at<R, NVU> (a micro-tile kernel's instances) for R = 1..MR, for each
// NVU = 1..NV; Kind names the kernel (its pointer type Fn and its instances at).
template <class Kind, int NVU, int... R>
constexpr std::array<typename Kind::Fn, MR> tiles_of(std::integer_sequence<int, R...>) {
  return {Kind::template at<R + 1, NVU>...};
}
template <class Kind, int... V>
constexpr std::array<std::array<typename Kind::Fn, MR>, NV> tile_table(
    std::integer_sequence<int, V...>) {
  return {tiles_of<Kind, V + 1>(std::make_integer_sequence<int, MR>{})...};
}

struct PanelTiles {
  using Fn = MicroTile;
  template <int R, int NVU>
  static constexpr Fn at = micro_tile<R, NVU>;
};
constexpr auto kTiles = tile_table<PanelTiles>(std::make_integer_sequence<int, NV>{});

inline const MicroTile* micro_tiles(int nvu) { return kTiles[nvu - 1].data(); }

// Rows [i0, i1) of one panel (j0: its first column, nc: its width).
void panel_rows(const float* a, int64_t sa_t, int64_t sa_i, int i0, int i1, const float* bp,
                int n_r, int ts, int k_last, const Out& c, int64_t j0, int nc,
                const Epilogue& e) {
  const PanelOut po(c, j0, nc);
  const int nvu = (nc + kLanes - 1) / kLanes;
  const MicroTile* tiles = micro_tiles(nvu);
  for (int i = i0; i < i1; i += MR) {
    Epilogue ei = e;
    if (e.row_bias != nullptr) ei.row_bias = e.row_bias + i;
    if (e.row_scale != nullptr) ei.row_scale = e.row_scale + i;
    if (e.res != nullptr) ei.res = e.res + i * c.ldc;
    const int r = i1 - i >= MR ? MR : i1 - i;
    tiles[r - 1](a + i * sa_i, sa_t, sa_i, bp, n_r, ts, k_last, c.base + i * c.ldc, c.ldc, po, ei);
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

// Copies n >= 1 floats with whole vectors: an inline vector copy per short run of an image row
// costs a fraction of a library memcpy call. A run of a vector or more ends with an
// overlapping vector; a shorter one is copied as one whole vector where `room` (floats readable
// at src and writable at dst) allows, the floats past n being overwritten later by the next run
// or the panel's zero padding.
inline void copy_run(float* dst, const float* src, int n, int64_t room) {
  if (n >= kLanes) {
    int q = 0;
    for (; q + kLanes <= n; q += kLanes) {
      const vf v = load(src + q);
      std::memcpy(dst + q, &v, sizeof(vf));
    }
    if (q < n) {
      const vf v = load(src + n - kLanes);
      std::memcpy(dst + n - kLanes, &v, sizeof(vf));
    }
  } else if (room >= kLanes) {
    const vf v = load(src);
    std::memcpy(dst, &v, sizeof(vf));
  } else {
    for (int q = 0; q < n; ++q) dst[q] = src[q];
  }
}

// Convolution input gathered straight into a packed panel (im2col without the unfolded matrix).
// geo: strides of the padded NCHW input (b, c, h, w; elements), first channel of the group,
// kh, kw, stride h, stride w, dilation h, dilation w, output h, output w, real rows k, and the
// number of floats readable from x. Rows from k on are not gathered (the kernel skips them).
void gather_conv_panel(const float* x, const int64_t* geo, int64_t j0, int nc, float* dst) {
  const int64_t s_b = geo[0], s_c = geo[1], s_h = geo[2], s_w = geo[3], c0 = geo[4];
  const int64_t kh = geo[5], kw = geo[6], sh = geo[7], sw = geo[8], dh = geo[9], dw = geo[10];
  const int64_t h_out = geo[11], w_out = geo[12], k = geo[13], extent = geo[14];
  // positions and kernel rows are walked with counters: integer divisions per element cost
  // more than the copies themselves on few-channel convolutions
  int64_t off[NR];
  {
    const int64_t hw = h_out * w_out;
    int64_t bi = j0 / hw, l = j0 % hw, oh = l / w_out, ow = l % w_out;
    for (int q = 0; q < nc; ++q) {
      off[q] = bi * s_b + oh * sh * s_h + ow * sw * s_w;
      if (++ow == w_out) {
        ow = 0;
        if (++oh == h_out) {
          oh = 0;
          ++bi;
        }
      }
    }
  }
  // runs of positions along an output row: their inputs are adjacent in memory (width stride
  // 1: vector copies) or evenly spaced (a strided loop instead of one position at a time)
  const int64_t hstep = sw * s_w;
  int run_start[NR + 1];
  int n_runs = 0;
  for (int q = 0; q < nc; ++q)
    if (q == 0 || off[q] != off[q - 1] + hstep) run_start[n_runs++] = q;
  run_start[n_runs] = nc;
  int64_t c = 0, i = 0, j = 0;  // kernel row r = (c * kh + i) * kw + j
  for (int r = 0; r < k; ++r) {
    float* d = dst + static_cast<int64_t>(r) * NR;
    const int64_t base = (c0 + c) * s_c + i * dh * s_h + j * dw * s_w;
    if (++j == kw) {
      j = 0;
      if (++i == kh) {
        i = 0;
        ++c;
      }
    }
    for (int u = 0; u < n_runs; ++u) {
      const int q0 = run_start[u], len = run_start[u + 1] - q0;
      const int64_t src = base + off[q0];
      if (len == 1) {
        d[q0] = x[src];
      } else if (hstep != 1) {
        const float* s = x + src;
        for (int q = 0; q < len; ++q) d[q0 + q] = s[q * hstep];
      } else {
        const int64_t room = extent - src < NR - q0 ? extent - src : NR - q0;
        copy_run(d + q0, x + src, len, room);
      }
    }
    for (int q = nc; q < NR; ++q) d[q] = 0.f;
  }
}

// Input offset of every kernel row r = (c * kh + i) * kw + j of a convolution with geometry
// geo (see gather_conv_panel), relative to a position's first input: malloc'd, k entries (at
// least one), or nullptr when the allocation failed.
int64_t* kernel_row_offsets(const int64_t* geo) {
  const int64_t s_c = geo[1], s_h = geo[2], s_w = geo[3], c0 = geo[4];
  const int64_t kh = geo[5], kw = geo[6], dh = geo[9], dw = geo[10], k = geo[13];
  int64_t* koff = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * (k > 0 ? k : 1)));
  if (koff == nullptr) return nullptr;
  int64_t c = 0, i = 0, j = 0;
  for (int64_t r = 0; r < k; ++r) {
    koff[r] = (c0 + c) * s_c + i * dh * s_h + j * dw * s_w;
    if (++j == kw) {
      j = 0;
      if (++i == kh) {
        i = 0;
        ++c;
      }
    }
  }
  return koff;
}

// Direct convolution (no gathered panel): C^T, R output positions by NVU vectors of 16 output
// channels. The weights are packed [n_r][ts][m_pad] (channels innermost, zero past m), so each
// kernel row k is NVU vector loads, and each position's input element is a scalar broadcast
// read straight from the padded input at xr[r] + koff[k]: no im2col copy at all, which is what
// a few-channel convolution's gathered panel spends most of its time on.
constexpr int kDirectPositions = 96;  // positions per work item (a multiple of every R below)

template <int NVU>
constexpr int direct_rows() {
  return NVU == 1 ? 12 : NVU == 2 ? 8 : 6;
}
static_assert(kDirectPositions % direct_rows<1>() == 0 && kDirectPositions % direct_rows<2>() == 0 &&
                  kDirectPositions % direct_rows<3>() == 0,
              "a work item's positions split into whole direct tiles");

template <int NVU>
void direct_tile(const float* const* xr, const int64_t* koff, const float* w, int64_t m_pad,
                 int n_r, int ts, int k_last, int m_valid, const float* bias_pad,
                 const int64_t* dst, int n_valid, float* c, int64_t ldc, const Epilogue& e) {
  constexpr int R = direct_rows<NVU>();
  vf acc[R][NVU];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NVU; ++j) acc[r][j] = vf{};
  const float* p[R];
  for (int r = 0; r < R; ++r) p[r] = xr[r];
  for (int t = 0; t < n_r; ++t) {
    vf s[R][NVU];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NVU; ++j) s[r][j] = vf{};
    const float* wt = w + static_cast<int64_t>(t) * ts * m_pad;
    const int64_t* kt = koff + static_cast<int64_t>(t) * ts;
    const int kn = t == n_r - 1 ? k_last : ts;
    for (int k = 0; k < kn; ++k) {
      vf wv[NVU];
      for (int j = 0; j < NVU; ++j) wv[j] = load(wt + k * m_pad + j * kLanes);
      const int64_t o = kt[k];
      for (int r = 0; r < R; ++r) {
        const float xv = p[r][o];
        for (int j = 0; j < NVU; ++j) s[r][j] += xv * wv[j];
      }
    }
    add_codes<R, NVU>(s, acc, e.qmax);
  }
  const bool relu_now = e.relu && e.res == nullptr;
  for (int r = 0; r < n_valid; ++r) {
    float lanes[NVU * kLanes];
    for (int j = 0; j < NVU; ++j) {
      vf v = acc[r][j] * (e.row_scale != nullptr ? load(e.row_scale + j * kLanes) : splat(e.scale));
      if (bias_pad != nullptr) v += load(bias_pad + j * kLanes);
      if (relu_now) v = v < 0 ? vf{} : v;
      std::memcpy(lanes + j * kLanes, &v, sizeof(vf));
    }
    float* out = c + dst[r];
    if (e.res == nullptr) {
      for (int m = 0; m < m_valid; ++m) out[m * ldc] = lanes[m];
      continue;
    }
    const float* rr = e.res + dst[r];
    for (int m = 0; m < m_valid; ++m) {
      const float v = lanes[m] + rr[m * ldc];
      out[m * ldc] = e.relu && v < 0 ? 0.f : v;
    }
  }
}

typedef void (*DirectTile)(const float* const*, const int64_t*, const float*, int64_t, int, int,
                           int, int, const float*, const int64_t*, int, float*, int64_t,
                           const Epilogue&);

// Row-segment convolution (stride 1 along the width): no gathered panel either, but the inputs
// of 16 adjacent output positions of one output row are 16 adjacent floats of the padded input
// for every kernel row k, so a micro-tile's B vectors are loaded straight from it at
// xb[j] + koff[k] (one base per segment j of 16 positions). R output channels by NVU segments.
// An output row of w_out >= 16 positions is covered by ceil(w_out / 16) segments, the last one
// ending at the row's end (overlapping its predecessor, computed and stored by the same
// micro-tile, so no lane is wasted on positions past the row and no input past it is read).
template <int R, int NVU>
void row_tile(const float* a, int64_t sa_t, int64_t sa_i, const float* const* xb,
              const int64_t* koff, int n_r, int ts, int k_last, float* c, int64_t ldc,
              const int64_t* dst, const Epilogue& e) {
  vf acc[R][NVU];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NVU; ++j) acc[i][j] = vf{};
  for (int t = 0; t < n_r; ++t) {
    vf s[R][NVU];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NVU; ++j) s[i][j] = vf{};
    const float* at = a + t * sa_t;
    const int64_t* kt = koff + static_cast<int64_t>(t) * ts;
    const int kn = t == n_r - 1 ? k_last : ts;
    for (int k = 0; k < kn; ++k) {
      const int64_t o = kt[k];
      vf v[NVU];
      for (int j = 0; j < NVU; ++j) v[j] = load(xb[j] + o);
      for (int i = 0; i < R; ++i) {
        const float w = at[i * sa_i + k];
        for (int j = 0; j < NVU; ++j) s[i][j] += w * v[j];
      }
    }
    add_codes<R, NVU>(s, acc, e.qmax);
  }
  for (int i = 0; i < R; ++i) {
    const float sc = e.row_scale != nullptr ? e.row_scale[i] : e.scale;
    float* ci = c + i * ldc;
    const float* ri = e.res != nullptr ? e.res + i * ldc : nullptr;
    for (int j = 0; j < NVU; ++j) {
      vf v = acc[i][j] * sc;
      if (e.row_bias != nullptr) v += e.row_bias[i];
      if (ri != nullptr) v += load(ri + dst[j]);
      if (e.relu) v = v < 0 ? vf{} : v;
      std::memcpy(ci + dst[j], &v, sizeof(vf));
    }
  }
}

typedef void (*RowTile)(const float*, int64_t, int64_t, const float* const*, const int64_t*, int,
                        int, int, float*, int64_t, const int64_t*, const Epilogue&);

struct RowTiles {
  using Fn = RowTile;
  template <int R, int NVU>
  static constexpr Fn at = row_tile<R, NVU>;
};
constexpr auto kRowTiles = tile_table<RowTiles>(std::make_integer_sequence<int, NV>{});

inline int panel_cols(int n_cols, int p) {
  const int nc = n_cols - p * NR;
  return nc > NR ? NR : nc;
}

}  // namespace

extern "C" {

// Interface version checked by the loader; bump with any signature change.
int nvmpriv_adc_abi(void) { return 8; }

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
// pad = (top, left, bottom, right): the destination's zero border around each [n1, n2] plane,
// written here too (rows j in [-top, 0) and [n1, n1 + bottom), columns k likewise), which costs
// little beside the codes, where a strided numpy assignment per border cost as much again.
}  // extern "C"

namespace {

// One row of DAC codes (see nvmpriv_dac_codes).
inline void dac_row(const float* src, float* dst, int64_t n, float step, float qmax) {
  if (step <= 0.0f) {
    for (int64_t k = 0; k < n; ++k) dst[k] = src[k];
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    float v = src[k] / step;
    v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
    dst[k] = (v + kMagic) - kMagic;
  }
}

}  // namespace

extern "C" {

void nvmpriv_dac_codes(const float* x, int64_t n0, int64_t n1, int64_t n2, int64_t sx0,
                       int64_t sx1, float* d, int64_t sd0, int64_t sd1, float step, float qmax,
                       const int64_t* pad, int n_threads) {
  const int64_t top = pad[0], left = pad[1], bottom = pad[2], right = pad[3];
  const int64_t plane_rows = n1 + top + bottom, rows = n0 * plane_rows;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(n_threads > 0 ? n_threads : 1) \
    if (rows * n2 >= (1 << 16))
#else
  (void)n_threads;
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / plane_rows, j = r % plane_rows - top;
    float* dst = d + i * sd0 + j * sd1;
    if (j < 0 || j >= n1) {
      std::memset(dst - left, 0, (left + n2 + right) * sizeof(float));
      continue;
    }
    if (left > 0) std::memset(dst - left, 0, left * sizeof(float));
    if (right > 0) std::memset(dst + n2, 0, right * sizeof(float));
    dac_row(x + i * sx0 + j * sx1, dst, n2, step, qmax);
  }
}

// The operands of nvmpriv_adc_gemm, passed as one struct: converting some 28 arguments one by
// one cost ctypes ~8 us per call, a fifth of a small layer's whole time.
struct GemmArgs {
  const float* a;         // A: element [t, i, k] at a[t*sa_t + i*sa_i + k], i < m_rows, k < ts
  const float* b;         // B: see below
  const int64_t* conv;    // convolution geometry (see gather_conv_panel), or NULL
  float* c;               // C: element (i, j) at c[i*ldc + (j / block)*ld_block + j % block]
  const float* bias;      // bias[i] per row of C (bias_axis 0) or bias[j] per column, or NULL
  const uint8_t* check;   // per tile row: record partial sums reaching thr (may be NULL)
  uint8_t* reach;         // n_threads * n_r bytes: reach[thread * n_r + t] (with check)
  const float* x;         // or NULL; else A's real rows are first written as DAC codes of x
  const float* row_scale;  // or NULL; else row i of C is scaled by row_scale[i] instead of scale
  const float* res;       // or NULL; else added (addressed as C) after the bias, before the ReLU
  int64_t sa_t, sa_i, sb_t, sb_k, ldc, block, ld_block, sx;
  int32_t m_rows, packed, n_r, ts, k_last, n_cols, p0, p1, bias_axis, relu, n_threads;
  float qmax, scale, thr, dac_step, dac_qmax;
};

// Column panels [p0, p1) of C = scale * sum_t ADC(A_t @ B_t) (+ bias) (+ res) (then ReLU),
// ADC(s) = round(clamp(s)), for the operands in *g (see GemmArgs).
//   B: packed by nvmpriv_adc_pack when `packed`; else, with `conv` (see gather_conv_panel),
//      gathered from the padded NCHW input b of a convolution; else element [t, k, j] at
//      b[t*sb_t + k*sb_k + j]. Unpacked panels are packed into a private buffer before use.
//   k_last: rows of the last tile row that are not zero padding (1..ts); the rest are skipped.
//   row_scale: per row of C, replaces scale (a BatchNormalization folded into scale and bias).
//   res: an array addressed as C, added after the bias (a residual Add).
//   relu: last, max(v, 0).
//   x (may be NULL; needs sa_t == ts): first A[i, k] = DAC codes of x[i*sx + k] for the real
//   rows k < (n_r - 1)*ts + k_last (see nvmpriv_dac_codes; dac_step <= 0: a copy), shared over
//   the same threads: one call instead of two for a layer's input and product.
// Work is shared over n_threads OpenMP threads where built with OpenMP: by panels, and with
// packed B and fewer panels than work for the threads also by blocks of rows. Returns 0, -1
// when a packing buffer could not be allocated, -2 for x without packed B and sa_t == ts.
int nvmpriv_adc_gemm(const GemmArgs* g) {
  const float *a = g->a, *b = g->b;
  const int64_t* conv = g->conv;
  const int64_t sa_t = g->sa_t, sa_i = g->sa_i, sb_t = g->sb_t, sb_k = g->sb_k;
  const int m_rows = g->m_rows, packed = g->packed, n_r = g->n_r, ts = g->ts;
  const int k_last = g->k_last, n_cols = g->n_cols, p0 = g->p0, p1 = g->p1;
  const float qmax = g->qmax, scale = g->scale, thr = g->thr;
  const float* bias = g->bias;
  const int bias_axis = g->bias_axis, relu = g->relu, n_threads = g->n_threads;
  const uint8_t* check = g->check;
  uint8_t* reach = g->reach;
  if (g->x != nullptr && (sa_t != ts || packed == 0)) return -2;
  const int64_t panel = static_cast<int64_t>(n_r) * ts * NR;
  const Out out{g->c, g->ldc, g->block, g->ld_block};
  const int n_p = p1 - p0 > 0 ? p1 - p0 : 0;
  const int threads = n_threads > 0 ? n_threads : 1;
  // a packed operand costs nothing to share, so few wide panels are also split by rows
  const int micro_rows = (m_rows + MR - 1) / MR;
  int n_blocks = 1;
  if (packed && threads > 1 && n_p > 0 && n_p < 4 * threads) {
    n_blocks = (2 * threads + n_p - 1) / n_p;
    if (n_blocks > micro_rows) n_blocks = micro_rows > 0 ? micro_rows : 1;
  }
  const int block_rows = ((micro_rows + n_blocks - 1) / n_blocks) * MR;
  const int n_items = n_p * n_blocks;
  int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
#endif
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    // every thread must reach the work-sharing loop, so a failed allocation only skips panels
    float* buf = packed ? nullptr
                        : static_cast<float*>(std::aligned_alloc(64, panel * sizeof(float)));
    alignas(64) float col_bias[NR];
    if (g->x != nullptr) {
      const int64_t k_real = static_cast<int64_t>(n_r - 1) * ts + k_last;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int i = 0; i < m_rows; ++i)
        dac_row(g->x + i * g->sx, const_cast<float*>(a) + i * sa_i, k_real, g->dac_step,
                g->dac_qmax);
    }  // the loop's implicit barrier: every row is written before any is read
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int item = 0; item < n_items; ++item) {
      const int p = p0 + item / n_blocks, rb = item % n_blocks;
      const int i0 = rb * block_rows, i1 = i0 + block_rows < m_rows ? i0 + block_rows : m_rows;
      if (i0 >= i1) continue;
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
          gather_conv_panel(b, conv, static_cast<int64_t>(p) * NR, nc, buf);
        } else {
          pack_panel(b, sb_t, sb_k, n_r, ts, p * NR, nc, buf);
        }
        bp = buf;
      }
      Epilogue e{qmax, scale, nullptr, nullptr, relu != 0, check, thr,
                 reach != nullptr ? reach + static_cast<int64_t>(tid) * n_r : nullptr};
      if (bias != nullptr && bias_axis == 0) e.row_bias = bias;
      e.row_scale = g->row_scale;
      e.res = g->res;
      if (bias != nullptr && bias_axis != 0) {
        std::memcpy(col_bias, bias + static_cast<int64_t>(p) * NR, nc * sizeof(float));
        for (int q = nc; q < NR; ++q) col_bias[q] = 0.f;
        e.col_bias = col_bias;
      }
      panel_rows(a, sa_t, sa_i, i0, i1, bp, n_r, ts, k_last, out,
                 static_cast<int64_t>(p) * NR, nc, e);
    }
    std::free(buf);
  }
  return failed ? -1 : 0;
}

// Convolution by direct_tile (see there) for the operands in *g: a = weights packed
// [n_r][ts][m_pad] (sa_i = m_pad, a multiple of 16), b = the padded NCHW input, conv = the
// geometry of gather_conv_panel, C as in nvmpriv_adc_gemm, bias and row_scale per output channel
// (bias_axis 0), res as in nvmpriv_adc_gemm.
// No clip check. Returns 0, -1 when a buffer could not be allocated, -2 for unsupported operands.
int nvmpriv_adc_conv_direct(const GemmArgs* g) {
  const int64_t* geo = g->conv;
  if (geo == nullptr || g->check != nullptr || g->sa_i % kLanes != 0 || g->sa_i <= 0 ||
      (g->bias != nullptr && g->bias_axis != 0))
    return -2;
  const int64_t s_b = geo[0], s_h = geo[2], s_w = geo[3], sh = geo[7], sw = geo[8];
  const int64_t h_out = geo[11], w_out = geo[12];
  const int n_r = g->n_r, ts = g->ts, k_last = g->k_last, m = g->m_rows;
  const int64_t m_pad = g->sa_i, n_pos = g->n_cols;
  const int n_cp = static_cast<int>((m_pad + NR - 1) / NR);  // channel panels of up to NR
  const int64_t n_blocks = (n_pos + kDirectPositions - 1) / kDirectPositions;
  int64_t* koff = kernel_row_offsets(geo);  // shared by all positions
  if (koff == nullptr) return -1;
  const float* x = g->b;
  const Epilogue base{g->qmax, g->scale, nullptr, nullptr, g->relu != 0, nullptr, 0.f, nullptr};
  const float* row_scale = g->row_scale;
  const int64_t n_items = n_blocks * n_cp;
  const int threads = g->n_threads > 0 ? g->n_threads : 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#else
  (void)threads;
#endif
  for (int64_t item = 0; item < n_items; ++item) {
    const int64_t blk = item / n_cp;
    const int cp = static_cast<int>(item % n_cp);
    const int64_t j0 = blk * kDirectPositions;
    const int n_here = static_cast<int>(n_pos - j0 < kDirectPositions ? n_pos - j0 : kDirectPositions);
    const float* xr[kDirectPositions];
    int64_t dst[kDirectPositions];
    {
      const int64_t hw = h_out * w_out;
      int64_t bi = j0 / hw, l = j0 % hw, oh = l / w_out, ow = l % w_out;
      int64_t ob = j0 / g->block, oo = j0 % g->block;
      for (int q = 0; q < n_here; ++q) {
        xr[q] = x + bi * s_b + oh * sh * s_h + ow * sw * s_w;
        dst[q] = ob * g->ld_block + oo;
        if (++ow == w_out) {
          ow = 0;
          if (++oh == h_out) {
            oh = 0;
            ++bi;
          }
        }
        if (++oo == g->block) {
          oo = 0;
          ++ob;
        }
      }
      for (int q = n_here; q < kDirectPositions; ++q) {  // padding rows repeat a real position
        xr[q] = xr[n_here - 1];
        dst[q] = dst[n_here - 1];
      }
    }
    const int m0 = cp * NR;
    const int m_valid = m - m0 < NR ? m - m0 : NR;
    const int nvu = static_cast<int>(((m_pad - m0 < NR ? m_pad - m0 : NR) + kLanes - 1) / kLanes);
    alignas(64) float bias_pad[NR];
    const float* bp = nullptr;
    if (g->bias != nullptr) {
      for (int q = 0; q < NR; ++q) bias_pad[q] = q < m_valid ? g->bias[m0 + q] : 0.f;
      bp = bias_pad;
    }
    Epilogue e = base;
    alignas(64) float scale_pad[NR];
    if (row_scale != nullptr) {
      for (int q = 0; q < NR; ++q) scale_pad[q] = q < m_valid ? row_scale[m0 + q] : 0.f;
      e.row_scale = scale_pad;
    }
    if (g->res != nullptr) e.res = g->res + static_cast<int64_t>(m0) * g->ldc;
    const float* w = g->a + m0;
    float* c = g->c + static_cast<int64_t>(m0) * g->ldc;
    static_assert(NV == 4, "one direct tile per vector count");
    static constexpr DirectTile kDirect[NV] = {direct_tile<1>, direct_tile<2>, direct_tile<3>,
                                               direct_tile<4>};
    static constexpr int kRows[NV] = {direct_rows<1>(), direct_rows<2>(), direct_rows<3>(),
                                      direct_rows<4>()};
    const int rows_per = kRows[nvu - 1];
    for (int q = 0; q < n_here; q += rows_per) {
      const int valid = n_here - q < rows_per ? n_here - q : rows_per;
      kDirect[nvu - 1](xr + q, koff, w, m_pad, n_r, ts, k_last, m_valid, bp, dst + q, valid, c,
                       g->ldc, e);
    }
  }
  std::free(koff);
  return 0;
}


// Convolution by row_tile (see there) for the operands in *g: a = weights [n_r][m][ts] as the
// gathered path's (sa_t, sa_i), b = the padded NCHW input with unit width stride, conv = the
// geometry of gather_conv_panel (stride 1 along the width, at least 16 output columns), C, bias
// (bias_axis 0), row_scale and res as in nvmpriv_adc_gemm (res must not alias C: the
// overlapping last segment of a row reads it after its predecessor's store). The output's
// block must hold whole output rows (a multiple of w_out), so that each segment's 16 columns
// are adjacent in C. No clip check. Work items are whole output rows (up to NV segments:
// several short rows, or part of a long one), so that the overlapping last segment of a row
// is stored by the micro-tile that stores its predecessor. Returns 0, -1 when a buffer could
// not be allocated, -2 for unsupported operands.
int nvmpriv_adc_conv_rows(const GemmArgs* g) {
  const int64_t* geo = g->conv;
  if (geo == nullptr || g->check != nullptr || (g->bias != nullptr && g->bias_axis != 0))
    return -2;
  const int64_t s_b = geo[0], s_h = geo[2], s_w = geo[3], sh = geo[7], sw = geo[8];
  const int64_t h_out = geo[11], w_out = geo[12], k = geo[13];
  if (s_w != 1 || sw != 1 || h_out < 1 || w_out < kLanes || k < 1 || g->block % w_out != 0)
    return -2;
  const int n_r = g->n_r, ts = g->ts, k_last = g->k_last, m = g->m_rows;
  const int64_t hw = h_out * w_out, n_img = g->n_cols / hw;
  if (n_img * hw != g->n_cols) return -2;
  const int per_row = static_cast<int>((w_out + kLanes - 1) / kLanes);  // segments per row
  // items: rows_per whole rows (short rows), or groups of a row's segments (long rows); a
  // lone last segment joins its predecessor's group (that one gives up its last but one)
  const int rows_per = per_row <= NV ? NV / per_row : 1;
  const int groups = per_row <= NV ? 1 : (per_row + NV - 1) / NV;
  const bool lone = per_row > NV && per_row % NV == 1;
  const int64_t n_rows = n_img * h_out;
  const int64_t n_items = per_row <= NV ? (n_rows + rows_per - 1) / rows_per : n_rows * groups;
  int64_t* koff = kernel_row_offsets(geo);
  if (koff == nullptr) return -1;
  const float* x = g->b;
  const Epilogue base{g->qmax, g->scale, nullptr, nullptr, g->relu != 0, nullptr, 0.f, nullptr};
  const int threads = g->n_threads > 0 ? g->n_threads : 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#else
  (void)threads;
#endif
  for (int64_t item = 0; item < n_items; ++item) {
    const float* xb[NV];
    int64_t dst[NV];
    int nvu = 0;
    int64_t row0 = item * rows_per, row1 = row0 + rows_per < n_rows ? row0 + rows_per : n_rows;
    int s0 = 0, s1 = per_row;
    if (per_row > NV) {
      row0 = item / groups;
      row1 = row0 + 1;
      const int gi = static_cast<int>(item % groups);
      s0 = gi * NV;
      s1 = s0 + NV < per_row ? s0 + NV : per_row;
      if (lone && gi == groups - 2) --s1;
      if (lone && gi == groups - 1) --s0;
    }
    for (int64_t row = row0; row < row1; ++row) {
      const int64_t bi = row / h_out, oh = row % h_out;
      for (int sg = s0; sg < s1; ++sg) {
        const int64_t ow0 = sg + 1 < per_row ? sg * kLanes : w_out - kLanes;
        xb[nvu] = x + bi * s_b + oh * sh * s_h + ow0;
        const int64_t pos = bi * hw + oh * w_out + ow0;  // column of C
        dst[nvu++] = (pos / g->block) * g->ld_block + pos % g->block;
      }
    }
    const RowTile* tiles = kRowTiles[nvu - 1].data();
    for (int i = 0; i < m; i += MR) {
      const int r = m - i >= MR ? MR : m - i;
      Epilogue e = base;
      if (g->bias != nullptr) e.row_bias = g->bias + i;
      if (g->row_scale != nullptr) e.row_scale = g->row_scale + i;
      if (g->res != nullptr) e.res = g->res + i * g->ldc;
      tiles[r - 1](g->a + i * g->sa_i, g->sa_t, g->sa_i, xb, koff, n_r, ts, k_last,
                   g->c + i * g->ldc, g->ldc, dst, e);
    }
  }
  std::free(koff);
  return 0;
}

}  // extern "C"
