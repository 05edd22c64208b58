// Runs the launchers of csrc/cuda (node_lora_kernels.h, meta_gconv_kernels.h, cuda_common.h) in the
// CPU emulator (emu_cuda.h) for one case, driven by tests/test_cuda_emulation.py:
//
//   harness CASE_DIR
//
// CASE_DIR/spec.txt holds "key value" lines (op, dtype code, dims); the inputs are raw little-endian
// arrays CASE_DIR/<name>.bin in the storage dtype (or the accumulation type where the launcher takes
// it). The whole pipeline of the op runs three times, with the threads of every block in forward,
// reversed and shuffled order; each output goes to CASE_DIR/<name>.<order>.bin (order 0, 1, 2) for
// the test to compare with its float64 reference and across orders. Output buffers start as 0xff
// bytes (a NaN in every float type, so an element no thread writes shows up) and are surrounded by
// canaries; a write outside a buffer or a launch error fails the run (exit status 1).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "cuda_common.h"
#include "emu_cuda.h"
#include "meta_gconv_kernels.h"
#include "node_lora_kernels.h"

namespace {

using stfast_cuda::DType;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "harness: %s\n", what.c_str());
  std::exit(1);
}

class Spec {
 public:
  explicit Spec(const std::string& path) {
    std::ifstream in(path);
    if (!in) die("cannot read " + path);
    std::string key, value;
    while (in >> key >> value) values_[key] = value;
  }
  const std::string& str(const std::string& key) const {
    const auto it = values_.find(key);
    if (it == values_.end()) die("spec lacks " + key);
    return it->second;
  }
  int64_t i(const std::string& key) const { return std::stoll(str(key)); }
  uint64_t u(const std::string& key) const { return std::stoull(str(key)); }
  double f(const std::string& key) const { return std::stod(str(key)); }
  // dims.*member = i(key) for each (key, member).
  template <typename Dims>
  void read(Dims& dims, std::initializer_list<std::pair<const char*, int64_t Dims::*>> fields) const {
    for (const auto& field : fields) dims.*field.second = i(field.first);
  }

 private:
  std::map<std::string, std::string> values_;
};

size_t storage_bytes(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    default:
      return 2;
  }
}
DType acc_dtype(DType dtype) { return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

// `count` elements of `elem` bytes between two canaries, all bytes 0xff to start with.
class Buffer {
 public:
  static constexpr size_t kPad = 64;
  Buffer(size_t count, size_t elem) : count_(count), elem_(elem), bytes_(count * elem + 2 * kPad, 0xff) {}
  void* p() { return bytes_.data() + kPad; }
  const char* data() const { return reinterpret_cast<const char*>(bytes_.data() + kPad); }
  size_t bytes() const { return count_ * elem_; }
  void zero() { std::memset(p(), 0, bytes()); }
  bool canaries_intact() const {
    for (size_t b = 0; b < kPad; ++b) {
      if (bytes_[b] != 0xff || bytes_[kPad + bytes() + b] != 0xff) return false;
    }
    return true;
  }

 private:
  size_t count_, elem_;
  std::vector<unsigned char> bytes_;
};

class Case {
 public:
  explicit Case(std::string dir) : dir_(std::move(dir)), spec_(dir_ + "/spec.txt") {}
  const Spec& spec() const { return spec_; }

  Buffer load(const std::string& name, size_t count, size_t elem) const {
    Buffer b(count, elem);
    const std::string path = dir_ + "/" + name + ".bin";
    std::ifstream in(path, std::ios::binary);
    if (!in) die("cannot read " + path);
    in.read(static_cast<char*>(b.p()), static_cast<std::streamsize>(b.bytes()));
    if (static_cast<size_t>(in.gcount()) != b.bytes() || in.peek() != EOF) die(path + ": wrong size");
    return b;
  }

  void save(const std::string& name, int order, const Buffer& b) const {
    if (!b.canaries_intact()) die(name + ": written outside its buffer (order " + std::to_string(order) + ")");
    const std::string path = dir_ + "/" + name + "." + std::to_string(order) + ".bin";
    std::ofstream out(path, std::ios::binary);
    out.write(b.data(), static_cast<std::streamsize>(b.bytes()));
    if (!out) die("cannot write " + path);
  }

 private:
  std::string dir_;
  Spec spec_;
};

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) die(what + " returned error " + std::to_string(static_cast<int>(err)));
}

// ---------------------------------------------------------------- node_lora

void run_node_lora(const Case& c, int order) {
  const Spec& s = c.spec();
  const DType dtype = static_cast<DType>(s.i("dtype"));
  const size_t es = storage_bytes(dtype), as = storage_bytes(acc_dtype(dtype));
  using Dims = stfast_cuda::NodeLoraDims;
  Dims d{};
  s.read(d, {{"M", &Dims::M}, {"N", &Dims::N}, {"K", &Dims::K}, {"O", &Dims::O}, {"R", &Dims::R}});
  d.activation = static_cast<int>(s.i("activation"));
  d.scale = s.f("scale");
  d.dropout_p = static_cast<float>(s.f("dropout_p"));
  d.inv_keep = static_cast<float>(1.0 / (1.0 - s.f("dropout_p")));
  const int64_t seed[2] = {static_cast<int64_t>(s.u("seed")), static_cast<int64_t>(s.u("offset"))};
  d.seed = seed;  // the kernels read (seed, offset) from "device" memory
  d.tensor_cores = static_cast<int>(s.i("tensor_cores"));
  const int64_t rows = d.M * d.N, N = d.N, K = d.K, O = d.O, R = d.R;
  const bool has_bias = s.i("bias") != 0;

  Buffer x = c.load("x", rows * K, es), w = c.load("weight", O * K, es), la = c.load("lora_a", N * K * R, es),
         lb = c.load("lora_b", N * R * O, es), g = c.load("grad", rows * O, es);
  Buffer bias = has_bias ? c.load("bias", O, es) : Buffer(0, es);

  Buffer y(rows * O, es);
  check(stfast_cuda::node_lora_forward(dtype, x.p(), w.p(), has_bias ? bias.p() : nullptr, la.p(), lb.p(), y.p(), d,
                                       nullptr),
        "node_lora_forward");
  c.save("y", order, y);

  Buffer grad_h(rows * R, as), scaled_a(rows * R, as), grad_h_only(rows * R, as), scaled_a_only(rows * R, as);
  check(stfast_cuda::node_lora_backward_lowrank(dtype, g.p(), x.p(), la.p(), lb.p(), grad_h.p(), scaled_a.p(), d,
                                                nullptr),
        "node_lora_backward_lowrank");
  check(stfast_cuda::node_lora_backward_lowrank(dtype, g.p(), x.p(), la.p(), lb.p(), grad_h_only.p(), nullptr, d,
                                                nullptr),
        "node_lora_backward_lowrank (grad_h only)");
  check(stfast_cuda::node_lora_backward_lowrank(dtype, g.p(), x.p(), la.p(), lb.p(), nullptr, scaled_a_only.p(), d,
                                                nullptr),
        "node_lora_backward_lowrank (scaled_a only)");
  c.save("grad_h", order, grad_h);
  c.save("scaled_a", order, scaled_a);
  c.save("grad_h_only", order, grad_h_only);
  c.save("scaled_a_only", order, scaled_a_only);

  Buffer dx(rows * K, es), da(N * K * R, es), db(N * R * O, es);
  check(stfast_cuda::node_lora_backward_dx(dtype, g.p(), w.p(), la.p(), grad_h.p(), dx.p(), d, nullptr),
        "node_lora_backward_dx");
  check(stfast_cuda::node_lora_backward_da(dtype, x.p(), grad_h.p(), da.p(), d, nullptr), "node_lora_backward_da");
  check(stfast_cuda::node_lora_backward_db(dtype, g.p(), scaled_a.p(), db.p(), d, nullptr), "node_lora_backward_db");
  c.save("dx", order, dx);
  c.save("d_lora_a", order, da);
  c.save("d_lora_b", order, db);

  // dW and db: both at once ([x, 1]), the weight alone, the bias alone.
  struct Variant {
    const char* name;
    int64_t x_columns;
    bool ones;
  };
  for (const Variant& v : {Variant{"dw_full", K, true}, Variant{"dw_weight", K, false}, Variant{"dw_bias", 0, true}}) {
    const int64_t C = v.x_columns + (v.ones ? 1 : 0);
    const int64_t parts = stfast_cuda::node_lora_dw_parts(d, C);
    Buffer part_buf(parts * O * C, as), summed(O * C, es);
    check(stfast_cuda::node_lora_backward_dw(dtype, g.p(), x.p(), part_buf.p(), v.x_columns, v.ones, d, nullptr),
          "node_lora_backward_dw");
    check(stfast_cuda::sum_parts(dtype, part_buf.p(), parts, O * C, summed.p(), nullptr), "sum_parts");
    c.save(v.name, order, summed);
    c.save(std::string(v.name) + "_parts", order, part_buf);
    if (order == 0) std::printf("%s_parts %lld\n", v.name, static_cast<long long>(parts));
  }

  Buffer mask(rows * K, es);
  check(stfast_cuda::node_lora_dropout_mask(dtype, mask.p(), rows * K, d.dropout_p, d.inv_keep, s.u("seed"), s.u("offset"),
                                            nullptr),
        "node_lora_dropout_mask");
  c.save("mask", order, mask);
}

// ---------------------------------------------------------------- meta_gconv

void run_meta_gconv(const Case& c, int order) {
  const Spec& s = c.spec();
  const DType dtype = static_cast<DType>(s.i("dtype"));
  const DType acc = acc_dtype(dtype);
  const size_t es = storage_bytes(dtype), as = storage_bytes(acc);
  using Dims = stfast_cuda::MetaGconvDims;
  Dims d{};
  s.read(d, {{"rows", &Dims::rows}, {"nodes", &Dims::nodes}, {"inputs", &Dims::inputs}, {"outputs", &Dims::outputs},
             {"dim", &Dims::dim}, {"stride_eb", &Dims::stride_eb}, {"stride_en", &Dims::stride_en},
             {"stride_ed", &Dims::stride_ed}});
  d.activation = static_cast<int>(s.i("activation"));
  d.tensor_cores = static_cast<int>(s.i("tensor_cores"));
  const int64_t M = d.rows, I = d.inputs, O = d.outputs, D = d.dim;
  const bool has_bias = s.i("bias") != 0;

  Buffer xg = c.load("xg", M * I, es), emb = c.load("emb", s.i("emb_count"), es), pool = c.load("pool", D * I * O, es),
         g = c.load("g", M * O, as);
  Buffer bias_pool = has_bias ? c.load("bias_pool", D * O, es) : Buffer(0, es);

  Buffer y(M * O, es);
  check(stfast_cuda::meta_gconv_forward(dtype, xg.p(), emb.p(), pool.p(), has_bias ? bias_pool.p() : nullptr, y.p(),
                                        d, nullptr),
        "meta_gconv_forward");
  c.save("y", order, y);

  // dxg and dE together, then each alone; the dE partials are zero-filled (as the glue does) and
  // summed in the accumulation type.
  const int64_t de_parts = stfast_cuda::meta_gconv_de_parts(d);
  Buffer dxg(M * I, es), de_part_buf(de_parts * M * D, as), dxg_only(M * I, es), de_only_parts(de_parts * M * D, as);
  de_part_buf.zero();
  de_only_parts.zero();
  check(stfast_cuda::meta_gconv_backward_dxg_de(dtype, g.p(), xg.p(), emb.p(), pool.p(), dxg.p(), de_part_buf.p(), d,
                                                nullptr),
        "meta_gconv_backward_dxg_de");
  check(stfast_cuda::meta_gconv_backward_dxg_de(dtype, g.p(), xg.p(), emb.p(), pool.p(), dxg_only.p(), nullptr, d,
                                                nullptr),
        "meta_gconv_backward_dxg_de (dxg only)");
  check(stfast_cuda::meta_gconv_backward_dxg_de(dtype, g.p(), xg.p(), emb.p(), pool.p(), nullptr, de_only_parts.p(),
                                                d, nullptr),
        "meta_gconv_backward_dxg_de (dE only)");
  Buffer de(M * D, as), de_only(M * D, as);
  check(stfast_cuda::sum_parts(acc, de_part_buf.p(), de_parts, M * D, de.p(), nullptr), "sum_parts (dE)");
  check(stfast_cuda::sum_parts(acc, de_only_parts.p(), de_parts, M * D, de_only.p(), nullptr), "sum_parts (dE)");
  c.save("dxg", order, dxg);
  c.save("dxg_only", order, dxg_only);
  c.save("de", order, de);
  c.save("de_only", order, de_only);

  const int64_t dp_parts = stfast_cuda::meta_gconv_dp_parts(d);
  Buffer dp_part_buf(dp_parts * D * I * O, as), dp(D * I * O, es);
  check(stfast_cuda::meta_gconv_backward_dp(dtype, g.p(), xg.p(), emb.p(), dp_part_buf.p(), d, nullptr),
        "meta_gconv_backward_dp");
  check(stfast_cuda::sum_parts(dtype, dp_part_buf.p(), dp_parts, D * I * O, dp.p(), nullptr), "sum_parts (dP)");
  c.save("dp", order, dp);
  c.save("dp_parts", order, dp_part_buf);
  if (order == 0) {
    std::printf("de_parts %lld\ndp_parts %lld\n", static_cast<long long>(de_parts), static_cast<long long>(dp_parts));
  }
}

// Whether the meta_gconv launchers accept the extents of the spec (32-bit in-tile indexing); where they
// do not, every launcher must refuse them before touching a pointer (all null here).
void run_meta_gconv_extents(const Case& c, int order) {
  if (order != 0) return;
  const Spec& s = c.spec();
  using Dims = stfast_cuda::MetaGconvDims;
  Dims d{};
  s.read(d, {{"rows", &Dims::rows}, {"nodes", &Dims::nodes}, {"inputs", &Dims::inputs}, {"outputs", &Dims::outputs},
             {"dim", &Dims::dim}, {"stride_eb", &Dims::stride_eb}, {"stride_en", &Dims::stride_en},
             {"stride_ed", &Dims::stride_ed}});
  d.tensor_cores = static_cast<int>(s.i("tensor_cores"));
  const bool supported = stfast_cuda::meta_gconv_extents_supported(d);
  std::printf("supported %d\n", supported ? 1 : 0);
  if (!supported) {
    const DType dtype = DType::kFloat32;
    std::printf("forward %d\n", static_cast<int>(stfast_cuda::meta_gconv_forward(dtype, nullptr, nullptr, nullptr,
                                                                                  nullptr, nullptr, d, nullptr)));
    std::printf("dxg_de %d\n", static_cast<int>(stfast_cuda::meta_gconv_backward_dxg_de(
                                   dtype, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, d, nullptr)));
    std::printf("dp %d\n", static_cast<int>(stfast_cuda::meta_gconv_backward_dp(dtype, nullptr, nullptr, nullptr,
                                                                                 nullptr, d, nullptr)));
  }
}

// ---------------------------------------------------------------- the emulator's half conversions

void run_conversions(const Case& c, int order) {
  const int64_t count = c.spec().i("count");
  Buffer values = c.load("values", count, 4), half(count, 2), bf16(count, 2), half_back(count, 4), bf16_back(count, 4);
  const float* v = static_cast<const float*>(values.p());
  for (int64_t j = 0; j < count; ++j) {
    static_cast<__half*>(half.p())[j] = __float2half_rn(v[j]);
    static_cast<__nv_bfloat16*>(bf16.p())[j] = __float2bfloat16_rn(v[j]);
    static_cast<float*>(half_back.p())[j] = __half2float(static_cast<__half*>(half.p())[j]);
    static_cast<float*>(bf16_back.p())[j] = __bfloat162float(static_cast<__nv_bfloat16*>(bf16.p())[j]);
  }
  c.save("half", order, half);
  c.save("bfloat16", order, bf16);
  c.save("half_back", order, half_back);
  c.save("bfloat16_back", order, bf16_back);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: harness CASE_DIR");
  const Case c(argv[1]);
  const std::string op = c.spec().str("op");
  const emu::Order orders[] = {emu::Order::kForward, emu::Order::kReversed, emu::Order::kShuffled};
  for (int order = 0; order < 3; ++order) {
    emu::set_order(orders[order], static_cast<unsigned>(c.spec().i("shuffle_seed")));
    if (op == "node_lora") {
      run_node_lora(c, order);
    } else if (op == "meta_gconv") {
      run_meta_gconv(c, order);
    } else if (op == "meta_gconv_extents") {
      run_meta_gconv_extents(c, order);
    } else if (op == "conversions") {
      run_conversions(c, order);
    } else {
      die("unknown op " + op);
    }
  }
  std::printf("barriers %ld\nasync_copies %ld\n", emu::state.barriers, emu::state.async_copies);
  return 0;
}
