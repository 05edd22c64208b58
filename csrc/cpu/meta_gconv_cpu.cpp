// CPU kernels of stfast_ext::meta_gconv_fwd / meta_gconv_bwd (fp32 and fp64; fp16 and bf16 are
// computed in fp32 and rounded once at the end).
//
// Notation (DESIGN.md): M = B*N rows, propagated features xg (M, I) with I = K*C, row embeddings
// E[m, :] (D wide), pools P (D, I, O) and Pb (D, O), y = act(sum_d E[m, d] (xg[m] @ P[d] + Pb[d])).
// The Chebyshev propagation xg = [x, A x, 2 A (A x) - x, ...] and its backward are ATen GEMMs in the
// glue (meta_gconv_common.cpp). The meta GEMM has two formulations, neither of which ever builds a
// weight (or the outer product z) for the whole problem:
//
// - "outer" (every axis; the only one for ST): with z[m, (d, i)] = E[m, d] * xg[m, i], y = z @ P as
//   (M, D*I) @ (D*I, O). Rows are cut into tiles (about kOuterTileBytes of z); a thread forms the z tile of its
//   rows in a private, cache-sized buffer and hands it to a BLAS GEMM (at::mm_out on the tile),
//   then adds E_tile @ Pb and applies the activation on the output tile while it is hot.
//   Measured against hand-written loops (csrc/README.md): as fast as AVX-512 loops built with
//   -march=native, 3x faster than the same loops in a portable build.
// - "grouped" (S and T): every row of a group shares one embedding (S: the B rows of node n, T: the
//   N rows of sample b), so y_g = xg_g @ W_g + b_g with W_g = sum_d E[g, d] P[d]. A thread forms W
//   for a small tile of groups (kGroupedTileBytes of weights, cache-resident) with one GEMM, applies
//   it with a batched GEMM and runs the bias + activation epilogue on the result. This does D times
//   fewer flops than "outer" for S and T, and still never builds the (N | B, I, O) weights of the
//   whole problem.
//
// Parallelism: at::parallel_for over row tiles (outer) or group tiles (grouped); the GEMMs inside run
// single-threaded (nested in the parallel region).
//
// Determinism: every output element of the forward, dxg and dE is written by exactly one tile.
// dP and dPb are sums over all rows: the tiles are split into `parts` contiguous ranges (parts =
// min(tiles, threads)); each part accumulates its tiles in order into its own buffer, and the parts
// are then summed element by element in part order. No atomics, no scheduling-dependent order:
// repeated runs with the same thread count give bitwise-equal results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <tuple>

#include "../meta_gconv_common.h"

namespace stfast_ext {
namespace {

// Tile sizes, measured at the METR-LA decoder shape on 2 cores (csrc/README.md): larger GEMMs per
// tile beat L2-sized tiles. Outer: about 1 MiB of z per tile (122 rows at D*I = 2144 in fp32; 16 rows
// gave 1.5x slower, 128-256 the best). Grouped: about 1 MiB of generated weights per tile of groups.
constexpr int64_t kOuterTileBytes = 1 << 20;
constexpr int64_t kGroupedTileBytes = 1 << 20;

// STFAST_CPU_TILE_ROWS / STFAST_CPU_GROUP_TILE_BYTES override the tile sizes (for tuning only).
int64_t env_or(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return fallback;
  }
  const long long parsed = std::atoll(value);
  return parsed > 0 ? static_cast<int64_t>(parsed) : fallback;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Embedding row of row m = (b, n): E is contiguous (N, D), (B, D) or (B, N, D).
template <typename T>
struct RowEmbedding {
  const T* data;
  int64_t nodes;
  int64_t dim;
  Axis axis;

  const T* row(int64_t m) const {
    switch (axis) {
      case Axis::kS:
        return data + (m % nodes) * dim;
      case Axis::kT:
        return data + (m / nodes) * dim;
      default:
        return data + m * dim;
    }
  }
};

// Fixed-order dot product (8 independent partial sums, vectorisable without -ffast-math).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      acc[j] += a[i + j] * b[i + j];
    }
  }
  T tail = 0;
  for (; i < n; ++i) {
    tail += a[i] * b[i];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// In place on a contiguous tile, with ATen's vectorised kernels (serial inside the parallel region).
void activate_(at::Tensor& tile, Activation activation) {
  if (activation == Activation::kSigmoid) {
    tile.sigmoid_();
  } else if (activation == Activation::kTanh) {
    tile.tanh_();
  }
}

// g = grad * act'(out) for `count` contiguous elements.
template <typename T>
inline void activation_grad(const T* grad, const T* out, T* g, int64_t count, Activation activation) {
  if (activation == Activation::kSigmoid) {
    for (int64_t j = 0; j < count; ++j) {
      g[j] = grad[j] * out[j] * (T(1) - out[j]);
    }
  } else if (activation == Activation::kTanh) {
    for (int64_t j = 0; j < count; ++j) {
      g[j] = grad[j] * (T(1) - out[j] * out[j]);
    }
  } else {
    std::copy(grad, grad + count, g);
  }
}

// sum over the leading (part) dimension, element by element in part order.
at::Tensor sum_parts(const at::Tensor& parts) {
  const int64_t count = parts.numel() / std::max<int64_t>(parts.size(0), 1);
  at::Tensor total = at::empty(parts.sizes().slice(1), parts.options());
  const int64_t n_parts = parts.size(0);
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "stfast_ext_sum_parts", [&] {
    const scalar_t* src = parts.data_ptr<scalar_t>();
    scalar_t* dst = total.data_ptr<scalar_t>();
    at::parallel_for(0, count, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t acc = src[j];
        for (int64_t p = 1; p < n_parts; ++p) {
          acc += src[p * count + j];
        }
        dst[j] = acc;
      }
    });
  });
  return total;
}

// The tiles [begin, end) that part p of n_parts owns.
inline std::pair<int64_t, int64_t> part_range(int64_t p, int64_t n_parts, int64_t tiles) {
  return {tiles * p / n_parts, tiles * (p + 1) / n_parts};
}

int64_t reduction_parts(int64_t tiles) {
  return std::max<int64_t>(1, std::min<int64_t>(tiles, at::get_num_threads()));
}

// ------------------------------------------------------------------ outer formulation

// Rows per tile: kOuterTileBytes of z, within [8, 256], and at least one tile per thread.
int64_t outer_tile_rows(const MetaShape& s, int64_t element_size) {
  const int64_t z_row_bytes = std::max<int64_t>(1, s.D * s.I * element_size);
  int64_t rows = std::min<int64_t>(256, std::max<int64_t>(8, kOuterTileBytes / z_row_bytes));
  rows = std::min(rows, std::max<int64_t>(8, ceil_div(s.rows(), at::get_num_threads())));
  return env_or("STFAST_CPU_TILE_ROWS", rows);
}

// z[r, d*I + i] = E[m, d] * xg[m, i] for the rows r0 .. r0+rows of one tile; e_out (optional)
// receives the tile's embedding rows.
template <typename T>
void build_z_tile(const RowEmbedding<T>& emb, const T* xg, int64_t inputs, int64_t r0, int64_t rows, T* z,
                  T* e_out) {
  const int64_t dim = emb.dim;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = r0 + r;
    const T* e = emb.row(m);
    const T* x = xg + m * inputs;
    if (z != nullptr) {
      T* zr = z + r * dim * inputs;
      for (int64_t d = 0; d < dim; ++d) {
        const T ed = e[d];
        T* zd = zr + d * inputs;
        for (int64_t i = 0; i < inputs; ++i) {
          zd[i] = ed * x[i];
        }
      }
    }
    if (e_out != nullptr) {
      std::copy(e, e + dim, e_out + r * dim);
    }
  }
}

template <typename T>
void outer_forward(const MetaShape& s, const at::Tensor& xg, const at::Tensor& emb_t, const at::Tensor& pool2d,
                   const at::Tensor& bias_pool, at::Tensor& out) {
  const int64_t rows_total = s.rows(), dim_inputs = s.D * s.I;
  const int64_t tile = outer_tile_rows(s, xg.element_size());
  const int64_t tiles = ceil_div(rows_total, tile);
  const RowEmbedding<T> emb{emb_t.data_ptr<T>(), s.N, s.D, s.axis};
  const T* xg_data = xg.data_ptr<T>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: once per worker
    at::Tensor z = at::empty({tile, dim_inputs}, xg.options());
    at::Tensor e = s.has_bias ? at::empty({tile, s.D}, xg.options()) : at::Tensor();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, rows = std::min(tile, rows_total - r0);
      build_z_tile<T>(emb, xg_data, s.I, r0, rows, z.data_ptr<T>(), s.has_bias ? e.data_ptr<T>() : nullptr);
      at::Tensor out_tile = out.narrow(0, r0, rows);
      at::mm_out(out_tile, z.narrow(0, 0, rows), pool2d);
      if (s.has_bias) {
        out_tile.addmm_(e.narrow(0, 0, rows), bias_pool);
      }
      activate_(out_tile, s.activation);
    }
  });
}

// Per-row dE (rows_total, D) when need_e (reduced to the axis by the caller).
template <typename T>
void outer_backward(const MetaShape& s, const at::Tensor& grad, const at::Tensor& out, const at::Tensor& xg,
                    const at::Tensor& emb_t, const at::Tensor& pool2d, const at::Tensor& bias_pool, at::Tensor& d_xg,
                    at::Tensor& d_e_rows, at::Tensor& d_pool2d, at::Tensor& d_bias) {
  const bool need_xg = d_xg.defined(), need_e = d_e_rows.defined(), need_pool = d_pool2d.defined(),
             need_bias = d_bias.defined();
  const int64_t rows_total = s.rows(), dim_inputs = s.D * s.I, outputs = s.O, inputs = s.I, dim = s.D;
  const int64_t tile = outer_tile_rows(s, xg.element_size());
  const int64_t tiles = ceil_div(rows_total, tile);
  const int64_t n_parts = reduction_parts(tiles);
  at::Tensor pool_parts = need_pool ? at::zeros({n_parts, dim_inputs, outputs}, xg.options()) : at::Tensor();
  at::Tensor bias_parts = need_bias ? at::zeros({n_parts, dim, outputs}, xg.options()) : at::Tensor();
  const RowEmbedding<T> emb{emb_t.data_ptr<T>(), s.N, s.D, s.axis};
  const T* xg_data = xg.data_ptr<T>();
  const T* grad_data = grad.data_ptr<T>();
  const T* out_data = s.activation != Activation::kNone ? out.data_ptr<T>() : nullptr;

  at::parallel_for(0, n_parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: once per worker
    at::Tensor g = at::empty({tile, outputs}, xg.options());
    at::Tensor z = need_pool ? at::empty({tile, dim_inputs}, xg.options()) : at::Tensor();
    at::Tensor e = at::empty({tile, dim}, xg.options());
    at::Tensor dz = (need_xg || need_e) ? at::empty({tile, dim_inputs}, xg.options()) : at::Tensor();
    for (int64_t p = p0; p < p1; ++p) {
      at::Tensor pool_part = need_pool ? pool_parts.select(0, p) : at::Tensor();
      at::Tensor bias_part = need_bias ? bias_parts.select(0, p) : at::Tensor();
      const auto range = part_range(p, n_parts, tiles);
      for (int64_t t = range.first; t < range.second; ++t) {
        const int64_t r0 = t * tile, rows = std::min(tile, rows_total - r0);
        // g = dy * act'(y), for this tile only.
        activation_grad<T>(grad_data + r0 * outputs, out_data ? out_data + r0 * outputs : nullptr,
                           g.data_ptr<T>(), rows * outputs, s.activation);
        const at::Tensor g_tile = g.narrow(0, 0, rows);
        build_z_tile<T>(emb, xg_data, inputs, r0, rows, need_pool ? z.data_ptr<T>() : nullptr, e.data_ptr<T>());
        const at::Tensor e_tile = e.narrow(0, 0, rows);
        if (need_pool) {  // dP += z^T g
          pool_part.addmm_(z.narrow(0, 0, rows).t(), g_tile);
        }
        if (need_bias) {  // dPb += E^T g
          bias_part.addmm_(e_tile.t(), g_tile);
        }
        if (!(need_xg || need_e)) {
          continue;
        }
        at::Tensor dz_tile = dz.narrow(0, 0, rows);
        at::mm_out(dz_tile, g_tile, pool2d.t());  // dz = g @ P^T: (rows, D*I)
        const T* dz_data = dz.data_ptr<T>();
        const T* e_data = e.data_ptr<T>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t m = r0 + r;
          const T* er = e_data + r * dim;
          const T* dzr = dz_data + r * dim_inputs;
          if (need_xg) {  // dxg[m] = sum_d E[m, d] dz[m, d, :]
            T* dx = d_xg.data_ptr<T>() + m * inputs;
            std::fill(dx, dx + inputs, T(0));
            for (int64_t d = 0; d < dim; ++d) {
              const T ed = er[d];
              const T* dzd = dzr + d * inputs;
              for (int64_t i = 0; i < inputs; ++i) {
                dx[i] += ed * dzd[i];
              }
            }
          }
          if (need_e) {  // dE[m, d] = xg[m] . dz[m, d, :]
            T* de = d_e_rows.data_ptr<T>() + m * dim;
            const T* x = xg_data + m * inputs;
            for (int64_t d = 0; d < dim; ++d) {
              de[d] = dot<T>(x, dzr + d * inputs, inputs);
            }
          }
        }
        if (need_e && s.has_bias) {  // + g @ Pb^T
          d_e_rows.narrow(0, r0, rows).addmm_(g_tile, bias_pool.t());
        }
      }
    }
  });
  if (need_pool) {
    d_pool2d.copy_(sum_parts(pool_parts));
  }
  if (need_bias) {
    d_bias.copy_(sum_parts(bias_parts));
  }
}

// ------------------------------------------------------------------ grouped formulation (S, T)

struct Groups {
  int64_t count;     // S: N nodes, T: B samples
  int64_t rows;      // rows per group: S: B, T: N
  int64_t per_tile;  // groups per tile
  int64_t tiles;
  Axis axis;
  int64_t nodes;

  // Row index m of row r of group g.
  int64_t row(int64_t g, int64_t r) const {
    return axis == Axis::kT ? g * nodes + r : r * nodes + g;
  }
};

Groups make_groups(const MetaShape& s, int64_t element_size) {
  Groups gr{};
  gr.axis = s.axis;
  gr.nodes = s.N;
  gr.count = s.axis == Axis::kT ? s.B : s.N;
  gr.rows = s.axis == Axis::kT ? s.N : s.B;
  const int64_t weight_bytes = std::max<int64_t>(1, s.I * s.O * element_size);
  gr.per_tile = std::max<int64_t>(1, env_or("STFAST_CPU_GROUP_TILE_BYTES", kGroupedTileBytes) / weight_bytes);
  // Keep at least two tiles per thread when there are enough groups, for balance.
  const int64_t balanced = ceil_div(gr.count, 2 * static_cast<int64_t>(at::get_num_threads()));
  gr.per_tile = std::max<int64_t>(1, std::min(gr.per_tile, balanced));
  gr.tiles = ceil_div(gr.count, gr.per_tile);
  return gr;
}

// xg as (groups, rows per group, I): a view, strided for S.
at::Tensor grouped_view(const at::Tensor& rows2d, const MetaShape& s) {
  const at::Tensor v = rows2d.view({s.B, s.N, rows2d.size(1)});
  return s.axis == Axis::kT ? v : v.transpose(0, 1);
}

template <typename T>
void grouped_forward(const MetaShape& s, const at::Tensor& xg, const at::Tensor& emb, const at::Tensor& pool_io,
                     const at::Tensor& bias_pool, at::Tensor& out) {
  const Groups gr = make_groups(s, xg.element_size());
  const at::Tensor xg_groups = grouped_view(xg, s);
  const int64_t inputs = s.I, outputs = s.O;
  // T: a group's rows are contiguous, so the GEMM writes straight into `out`; S: through a buffer.
  const bool contiguous = s.axis == Axis::kT;
  at::parallel_for(0, gr.tiles, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: once per worker
    at::Tensor w = at::empty({gr.per_tile, inputs * outputs}, xg.options());
    at::Tensor y = contiguous ? at::Tensor() : at::empty({gr.per_tile, gr.rows, outputs}, xg.options());
    at::Tensor bias = s.has_bias ? at::empty({gr.per_tile, outputs}, xg.options()) : at::Tensor();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g0 = t * gr.per_tile, n = std::min(gr.per_tile, gr.count - g0);
      const at::Tensor e_tile = emb.narrow(0, g0, n);
      at::Tensor w_tile = w.narrow(0, 0, n);
      at::mm_out(w_tile, e_tile, pool_io);  // W_g = sum_d E[g, d] P[d], cache-resident
      at::Tensor y_tile = contiguous ? out.view({gr.count, gr.rows, outputs}).narrow(0, g0, n) : y.narrow(0, 0, n);
      at::bmm_out(y_tile, xg_groups.narrow(0, g0, n), w_tile.view({n, inputs, outputs}));
      if (s.has_bias) {
        at::Tensor b_tile = bias.narrow(0, 0, n);
        at::mm_out(b_tile, e_tile, bias_pool);
        y_tile.add_(b_tile.unsqueeze(1));
      }
      activate_(y_tile, s.activation);
      if (contiguous) {
        continue;
      }
      // Scatter the hot tile to its rows (strided by N for S).
      const T* y_data = y.data_ptr<T>();
      T* out_data = out.data_ptr<T>();
      for (int64_t gi = 0; gi < n; ++gi) {
        for (int64_t r = 0; r < gr.rows; ++r) {
          const T* src = y_data + (gi * gr.rows + r) * outputs;
          std::copy(src, src + outputs, out_data + gr.row(g0 + gi, r) * outputs);
        }
      }
    }
  });
}

template <typename T>
void grouped_backward(const MetaShape& s, const at::Tensor& grad, const at::Tensor& out, const at::Tensor& xg,
                      const at::Tensor& emb, const at::Tensor& pool_io, const at::Tensor& bias_pool, at::Tensor& d_xg,
                      at::Tensor& d_e, at::Tensor& d_pool_io, at::Tensor& d_bias) {
  const bool need_xg = d_xg.defined(), need_e = d_e.defined(), need_pool = d_pool_io.defined(),
             need_bias = d_bias.defined();
  const bool need_dw = need_e || need_pool;
  const bool need_dwb = s.has_bias && (need_e || need_bias);
  const Groups gr = make_groups(s, xg.element_size());
  const at::Tensor xg_groups = grouped_view(xg, s);
  const int64_t inputs = s.I, outputs = s.O, dim = s.D;
  const int64_t n_parts = reduction_parts(gr.tiles);
  at::Tensor pool_parts = need_pool ? at::zeros({n_parts, dim, inputs * outputs}, xg.options()) : at::Tensor();
  at::Tensor bias_parts = need_bias ? at::zeros({n_parts, dim, outputs}, xg.options()) : at::Tensor();
  const T* grad_data = grad.data_ptr<T>();
  const T* out_data = s.activation != Activation::kNone ? out.data_ptr<T>() : nullptr;

  // T: a group's rows are contiguous: no gather of g without an activation, dxg written in place.
  const bool contiguous = s.axis == Axis::kT;
  at::parallel_for(0, n_parts, 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: once per worker
    at::Tensor g = contiguous && s.activation == Activation::kNone
                       ? at::Tensor()
                       : at::empty({gr.per_tile, gr.rows, outputs}, xg.options());
    at::Tensor w = need_xg ? at::empty({gr.per_tile, inputs * outputs}, xg.options()) : at::Tensor();
    at::Tensor dx = need_xg && !contiguous ? at::empty({gr.per_tile, gr.rows, inputs}, xg.options()) : at::Tensor();
    at::Tensor dw = need_dw ? at::empty({gr.per_tile, inputs * outputs}, xg.options()) : at::Tensor();
    at::Tensor dwb = need_dwb ? at::empty({gr.per_tile, outputs}, xg.options()) : at::Tensor();
    for (int64_t p = p0; p < p1; ++p) {
      at::Tensor pool_part = need_pool ? pool_parts.select(0, p) : at::Tensor();
      at::Tensor bias_part = need_bias ? bias_parts.select(0, p) : at::Tensor();
      const auto range = part_range(p, n_parts, gr.tiles);
      for (int64_t t = range.first; t < range.second; ++t) {
        const int64_t g0 = t * gr.per_tile, n = std::min(gr.per_tile, gr.count - g0);
        // g = dy * act'(y) for the tile's rows, as a (n, rows, O) tensor.
        at::Tensor g_tile;
        if (!g.defined()) {
          g_tile = grad.view({gr.count, gr.rows, outputs}).narrow(0, g0, n);
        } else if (contiguous) {
          const int64_t first = g0 * gr.rows * outputs;
          activation_grad<T>(grad_data + first, out_data ? out_data + first : nullptr, g.data_ptr<T>(),
                             n * gr.rows * outputs, s.activation);
          g_tile = g.narrow(0, 0, n);
        } else {
          T* g_data = g.data_ptr<T>();
          for (int64_t gi = 0; gi < n; ++gi) {
            for (int64_t r = 0; r < gr.rows; ++r) {
              const int64_t m = gr.row(g0 + gi, r);
              activation_grad<T>(grad_data + m * outputs, out_data ? out_data + m * outputs : nullptr,
                                 g_data + (gi * gr.rows + r) * outputs, outputs, s.activation);
            }
          }
          g_tile = g.narrow(0, 0, n);
        }
        const at::Tensor e_tile = emb.narrow(0, g0, n);
        const at::Tensor xg_tile = xg_groups.narrow(0, g0, n);
        if (need_xg) {  // dxg_g = g_g @ W_g^T
          at::Tensor w_tile = w.narrow(0, 0, n);
          at::mm_out(w_tile, e_tile, pool_io);
          at::Tensor dx_tile = contiguous ? d_xg.view({gr.count, gr.rows, inputs}).narrow(0, g0, n) : dx.narrow(0, 0, n);
          at::bmm_out(dx_tile, g_tile, w_tile.view({n, inputs, outputs}).transpose(1, 2));
          if (!contiguous) {  // scatter to the rows of the S groups (strided by N)
            const T* src = dx.data_ptr<T>();
            T* dst = d_xg.data_ptr<T>();
            for (int64_t gi = 0; gi < n; ++gi) {
              for (int64_t r = 0; r < gr.rows; ++r) {
                const T* row = src + (gi * gr.rows + r) * inputs;
                std::copy(row, row + inputs, dst + gr.row(g0 + gi, r) * inputs);
              }
            }
          }
        }
        at::Tensor dw_tile = need_dw ? dw.narrow(0, 0, n) : at::Tensor();
        at::Tensor dwb_tile = need_dwb ? dwb.narrow(0, 0, n) : at::Tensor();
        if (need_dw) {  // dW_g = xg_g^T g_g
          at::Tensor dw_view = dw_tile.view({n, inputs, outputs});
          at::bmm_out(dw_view, xg_tile.transpose(1, 2), g_tile);
        }
        if (need_dwb) {  // db_g = sum of g_g's rows
          at::sum_out(dwb_tile, g_tile, at::IntArrayRef{1});
        }
        if (need_e) {  // dE_g = P . dW_g + Pb . db_g: every group written once
          at::Tensor de_tile = d_e.narrow(0, g0, n);
          at::mm_out(de_tile, dw_tile, pool_io.t());
          if (s.has_bias) {
            de_tile.addmm_(dwb_tile, bias_pool.t());
          }
        }
        if (need_pool) {  // dP += E_tile^T dW_tile
          pool_part.addmm_(e_tile.t(), dw_tile);
        }
        if (need_bias) {
          bias_part.addmm_(e_tile.t(), dwb_tile);
        }
      }
    }
  });
  if (need_pool) {
    d_pool_io.copy_(sum_parts(pool_parts));
  }
  if (need_bias) {
    d_bias.copy_(sum_parts(bias_parts));
  }
}

// ------------------------------------------------------------------ glue

bool use_grouped(const char* op, Formulation formulation, Axis axis) {
  if (formulation == Formulation::kGrouped) {
    TORCH_CHECK_VALUE(axis != Axis::kST, op,
                      ": formulation: 'grouped' needs axis 'S' or 'T' (rows sharing an embedding), got 'ST'");
    return true;
  }
  return formulation == Formulation::kAuto && axis != Axis::kST;
}

bool reduced_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) {
    return t;
  }
  return t->to(at::kFloat);
}

at::Tensor meta_gconv_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& supports,
                              const at::Tensor& embeddings, const at::Tensor& weights_pool,
                              const std::optional<at::Tensor>& bias_pool, int64_t cheb_k,
                              std::optional<c10::string_view> activation, c10::string_view axis,
                              c10::string_view formulation) {
  constexpr const char* op = "stfast_ext::meta_gconv_fwd";
  // Plain kernels: the ATen calls below (out= GEMMs on tiles) must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Activation act = parse_activation(op, activation);
  const Axis ax = parse_axis(op, axis);
  const Formulation form = parse_formulation(op, formulation);
  const MetaShape s = check_meta_gconv_inputs(op, x, supports, embeddings, weights_pool, bias_pool, cheb_k, act, ax);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x: expected a CPU tensor, got device ", x.device());
  const bool grouped = use_grouped(op, form, ax);
  if (reduced_precision(x)) {  // fp32 compute, one rounding at the end
    return meta_gconv_fwd_cpu(x.to(at::kFloat), to_float(supports), embeddings.to(at::kFloat),
                              weights_pool.to(at::kFloat), to_float(bias_pool), cheb_k, activation, axis, formulation)
        .to(x.scalar_type());
  }
  const at::Tensor xg = chebyshev_features(x, supports, cheb_k).reshape({s.rows(), s.I}).contiguous();
  const at::Tensor emb = embeddings.contiguous();
  const at::Tensor pool = weights_pool.contiguous();
  const at::Tensor pb = s.has_bias ? bias_pool->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.rows(), s.O}, x.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stfast_ext_meta_gconv_fwd_cpu", [&] {
      if (grouped) {
        const at::Tensor emb2d = emb.reshape({-1, s.D});
        grouped_forward<scalar_t>(s, xg, emb2d, pool.view({s.D, s.I * s.O}), pb, out);
      } else {
        outer_forward<scalar_t>(s, xg, emb, pool.view({s.D * s.I, s.O}), pb, out);
      }
    });
  }
  return out.view({s.B, s.N, s.O});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_gconv_bwd_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& out, const at::Tensor& x,
    const std::optional<at::Tensor>& supports, const at::Tensor& embeddings, const at::Tensor& weights_pool,
    const std::optional<at::Tensor>& bias_pool, int64_t cheb_k, std::optional<c10::string_view> activation,
    c10::string_view axis, std::array<bool, 5> needs, c10::string_view formulation) {
  constexpr const char* op = "stfast_ext::meta_gconv_bwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Activation act = parse_activation(op, activation);
  const Axis ax = parse_axis(op, axis);
  const Formulation form = parse_formulation(op, formulation);
  const MetaShape s = check_meta_gconv_inputs(op, x, supports, embeddings, weights_pool, bias_pool, cheb_k, act, ax);
  check_meta_gconv_backward_inputs(op, s, x, grad, out);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x: expected a CPU tensor, got device ", x.device());
  const bool grouped = use_grouped(op, form, ax);
  const bool has_supports = supports.has_value() && supports->defined();
  if (reduced_precision(x)) {
    auto grads = meta_gconv_bwd_cpu(grad.to(at::kFloat), to_float(out), x.to(at::kFloat), to_float(supports),
                                    embeddings.to(at::kFloat), weights_pool.to(at::kFloat), to_float(bias_pool),
                                    cheb_k, activation, axis, needs, formulation);
    const auto dtype = x.scalar_type();
    return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype), std::get<2>(grads).to(dtype),
            std::get<3>(grads).to(dtype), std::get<4>(grads).to(dtype)};
  }
  const bool need_x = needs[0], need_supports = needs[1] && has_supports, need_e = needs[2], need_pool = needs[3],
             need_bias = needs[4] && s.has_bias;
  const bool need_xg = need_x || need_supports;

  const at::Tensor xg3 = chebyshev_features(x, supports, cheb_k);  // recomputed, as in the torch backend
  const at::Tensor xg = xg3.reshape({s.rows(), s.I}).contiguous();
  const at::Tensor grad2d = grad.contiguous().view({s.rows(), s.O});
  const at::Tensor out2d = act != Activation::kNone ? out->contiguous().view({s.rows(), s.O}) : at::Tensor();
  const at::Tensor emb = embeddings.contiguous();
  const at::Tensor pool = weights_pool.contiguous();
  const at::Tensor pb = s.has_bias ? bias_pool->contiguous() : at::Tensor();

  at::Tensor d_xg = need_xg ? at::empty({s.rows(), s.I}, x.options()) : at::Tensor();
  at::Tensor d_pool = need_pool ? at::empty({s.D, s.I, s.O}, x.options()) : at::Tensor();
  at::Tensor d_bias = need_bias ? at::empty({s.D, s.O}, x.options()) : at::Tensor();
  at::Tensor d_e;
  const at::Tensor empty = x.new_empty({0});
  const bool any = need_xg || need_e || need_pool || need_bias;
  if (any && s.rows() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "stfast_ext_meta_gconv_bwd_cpu", [&] {
      if (grouped) {
        const at::Tensor emb2d = emb.reshape({-1, s.D});
        d_e = need_e ? at::empty({emb2d.size(0), s.D}, x.options()) : at::Tensor();
        at::Tensor d_pool_io = need_pool ? d_pool.view({s.D, s.I * s.O}) : at::Tensor();
        grouped_backward<scalar_t>(s, grad2d, out2d, xg, emb2d, pool.view({s.D, s.I * s.O}), pb, d_xg, d_e,
                                   d_pool_io, d_bias);
        if (need_e) {
          d_e = d_e.view(embeddings.sizes());
        }
      } else {
        at::Tensor d_e_rows = need_e ? at::empty({s.rows(), s.D}, x.options()) : at::Tensor();
        at::Tensor d_pool2d = need_pool ? d_pool.view({s.D * s.I, s.O}) : at::Tensor();
        outer_backward<scalar_t>(s, grad2d, out2d, xg, emb, pool.view({s.D * s.I, s.O}), pb, d_xg, d_e_rows,
                                 d_pool2d, d_bias);
        if (need_e) {
          d_e = reduce_to_axis(d_e_rows, ax, s.B, s.N).reshape(embeddings.sizes()).contiguous();
        }
      }
    });
  } else {  // no rows: every gradient is zero
    if (need_xg) d_xg.zero_();
    if (need_e) d_e = at::zeros_like(embeddings);
    if (need_pool) d_pool.zero_();
    if (need_bias) d_bias.zero_();
  }

  at::Tensor d_x = empty, d_supports = empty;
  if (need_xg) {
    auto dx_ds = chebyshev_backward(d_xg.view({s.B, s.N, s.I}), xg3, supports, cheb_k, need_supports);
    if (need_x) {
      d_x = dx_ds[0].contiguous();
    }
    if (need_supports) {
      d_supports = dx_ds[1];
    }
  }
  return {d_x, d_supports, need_e ? d_e : empty, need_pool ? d_pool : empty, need_bias ? d_bias : empty};
}

}  // namespace
}  // namespace stfast_ext

TORCH_LIBRARY_IMPL(stfast_ext, CPU, m) {
  m.impl("meta_gconv_fwd", &stfast_ext::meta_gconv_fwd_cpu);
  m.impl("meta_gconv_bwd", &stfast_ext::meta_gconv_bwd_cpu);
}
