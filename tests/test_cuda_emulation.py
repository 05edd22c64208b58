"""The CUDA kernels' logic, on the CPU: csrc/cuda/*.cu compiled by the host C++ compiler against the
emulator in tests/cuda_emulation/ (emu_cuda.h: blocks run in turn, the threads of a block are fibers
that meet at every __syncthreads; read it for what it does and does not model), then every launcher of
node_lora (forward, backward low-rank rows / dx / dA / dB / dW + sum_parts, dropout mask) and of
meta_gconv (forward, backward dxg / dE, dP, sum_parts) run on small odd shapes in fp32 and fp64
against float64 references computed here with torch. Each case runs with the threads of every block
in forward, reversed and shuffled order, and the results must be bitwise equal (a missing barrier
shows up as a difference); barriers must be block-uniform (the emulator aborts otherwise).

The sources are compiled unchanged except for the launch syntax ``k<<<grid, block, 0, s>>>(args)``,
which is rewritten to ``emu::Launch(grid, block, 0, s)(k, args)`` in a temporary copy (``#line``
keeps compiler messages pointing at csrc/cuda). Inputs and outputs pass through raw binary files in
pytest's temporary folder (tests/cuda_emulation/harness.cpp is the C++ side).

The tensor-core kernels run through the WMMA stand-in (shim/mma.h) and the forward's cp.async staging
through shim/cuda_pipeline.h (undefined data until the issuing thread waits: see emu_cuda.h); the
harness counts the asynchronous copies so that the tests can tell which staging path ran.

What this cannot catch (GPU machines: tests/test_node_lora_ext_cuda.py and the meta_gconv CUDA
tests): warp-level and memory-model effects, resource limits (shared memory, registers), speed, and
differences between nvcc's and the host compiler's arithmetic.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emulation"
KERNEL_SOURCES = ("cuda_common.cu", "node_lora_kernels.cu", "meta_gconv_kernels.cu")
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # stfast_cuda::DType
# max error / max(1, max |reference|); fp16 / bf16: computed in fp32, rounded once
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-13, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# kernel<T><<<config>>>(   (the kernel name may be qualified and carry template arguments)
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\((\s*\))?", re.DOTALL)


def rewrite_launches(text: str) -> tuple[str, int]:
    """``text`` with every ``<<<...>>>`` launch written as an ``emu::Launch`` call, and their count."""

    def launch(match):
        kernel, config, no_args = match.groups()
        return f"emu::Launch({config})({kernel}" + (")" if no_args else ", ")

    return LAUNCH.subn(launch, text)


def translate(source: Path) -> str:
    """The .cu source ready for the host compiler (launches rewritten, messages pointing at it)."""
    text = source.read_text()
    out, count = rewrite_launches(text)
    assert count == text.count("<<<") and "<<<" not in out, f"{source}: a launch the rewrite does not recognise"
    return f'#line 1 "{source}"\n{out}'


def _compiler() -> list[str] | None:
    """``$CXX`` (may carry a launcher, e.g. ``ccache g++``) if set and found, else g++ / c++ / clang++."""
    if os.environ.get("CXX"):
        command = shlex.split(os.environ["CXX"])
        return command if command and shutil.which(command[0]) else None
    found = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return [found] if found else None


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    """The compiled emulation harness (kernels + emulator + tests/cuda_emulation/harness.cpp)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the emulator's fibers use ucontext (Linux / glibc)")
    cxx = _compiler()
    if cxx is None:
        cxx_env = os.environ.get("CXX")
        why = f"CXX={cxx_env!r} not found" if cxx_env else "no g++, c++ or clang++ on PATH"
        pytest.skip(f"no C++ compiler to build the CUDA emulation ({why})")
    build = tmp_path_factory.mktemp("cuda_emulation")
    units = [EMU_DIR / "harness.cpp"]
    for name in KERNEL_SOURCES:
        unit = build / f"{name}.cc"
        unit.write_text(translate(CUDA_DIR / name))
        units.append(unit)
    flags = ["-std=c++17", "-O1", "-x", "c++", "-D__CUDACC__", f"-I{EMU_DIR / 'shim'}", f"-I{EMU_DIR}",
             f"-I{CUDA_DIR}", f"-I{CUDA_DIR.parent}"]

    def compile_unit(unit: Path) -> subprocess.CompletedProcess:
        return subprocess.run([*cxx, *flags, "-c", str(unit), "-o", str(build / f"{unit.name}.o")],
                              capture_output=True, text=True, check=False)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_unit, units))
    for unit, result in zip(units, results):
        assert result.returncode == 0, f"compiling {unit.name} for the emulation failed:\n{result.stderr}"
    exe = build / "harness"
    link = subprocess.run([*cxx, *[str(build / f"{u.name}.o") for u in units], "-o", str(exe)],
                          capture_output=True, text=True, check=False)
    assert link.returncode == 0, link.stderr
    return exe


def _write(path: Path, tensor: torch.Tensor) -> None:
    path.write_bytes(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())


@dataclass
class Run:
    """The outputs of one harness run: ``get(name)`` in the given dtype, all three thread orders."""

    folder: Path
    info: dict = field(default_factory=dict)

    def orders(self, name: str) -> list[bytes]:
        return [(self.folder / f"{name}.{order}.bin").read_bytes() for order in range(3)]

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        data = self.orders(name)[0]
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)


def run_case(exe: Path, folder: Path, spec: dict, inputs: dict) -> Run:
    folder.mkdir()
    (folder / "spec.txt").write_text("".join(f"{key} {value}\n" for key, value in spec.items()))
    for name, tensor in inputs.items():
        _write(folder / f"{name}.bin", tensor)
    result = subprocess.run([str(exe), str(folder)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"emulation failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    info = dict(line.split() for line in result.stdout.splitlines())
    return Run(folder, {key: int(value) for key, value in info.items()})


def check_orders(run: Run, names) -> None:
    for name in names:
        first, *others = run.orders(name)
        for order, other in enumerate(others, 1):
            assert other == first, f"{name}: thread order {order} changes the result (a race)"


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    want = want.reshape(-1).double()
    assert got.numel() == want.numel(), f"{name}: {got.numel()} elements, expected {want.numel()}"
    got = got.double()
    assert not got.isnan().any(), f"{name}: {int(got.isnan().sum())} elements never written"
    if want.numel():
        err = (got - want).abs().max().item()
        bound = tol * max(1.0, want.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def random_inputs(seed: int, dtype: torch.dtype, **shapes) -> dict:
    """Standard normal tensors of the given shapes, drawn in float64, stored in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for name, shape in shapes.items()}


# ---------------------------------------------------------------- node_lora

NODE_LORA_ACTIVATIONS = {  # stfast_math::LoraActivation codes
    0: lambda h: h,
    1: lambda h: F.leaky_relu(h, 0.01),
    2: F.relu,
    3: torch.tanh,
    4: torch.sigmoid,
}


@dataclass(frozen=True)
class LoraCase:
    M: int
    N: int
    K: int
    O: int
    R: int
    activation: int
    bias: bool = True
    dropout_p: float = 0.0
    seed: int = 0
    offset: int = 0
    scale: float = 0.7
    multi_slice: bool = False  # dW over more than one row slice


LORA_CASES = {
    "leaky_rank1": LoraCase(5, 3, 70, 67, 1, 1),
    "sigmoid_rank37_dropout": LoraCase(33, 2, 31, 129, 37, 4, dropout_p=0.3, seed=5, offset=11, scale=1.3),
    "tanh_single_element_nobias": LoraCase(1, 1, 1, 1, 1, 3, bias=False, scale=0.5),
    "relu_rank64_dropout": LoraCase(40, 5, 65, 64, 64, 2, dropout_p=0.5, seed=(1 << 40) + 3, offset=17, scale=2.0),
    "no_rows": LoraCase(0, 3, 4, 5, 2, 1),
    "no_inputs_dropout": LoraCase(3, 2, 0, 5, 3, 4, dropout_p=0.2, seed=1, scale=0.9),
    "no_outputs": LoraCase(4, 2, 5, 0, 3, 3),
    "identity_multislice_dropout": LoraCase(300, 4, 9, 10, 2, 0, dropout_p=0.1, seed=9, offset=3, multi_slice=True),
    "tanh_37nodes_nobias": LoraCase(7, 37, 13, 5, 16, 3, bias=False, scale=0.25),
    "leaky_rank70_two_output_tiles": LoraCase(9, 2, 20, 70, 70, 1, scale=0.8),  # two rank chunks of the tc forward
}
LORA_FP64 = ("sigmoid_rank37_dropout", "relu_rank64_dropout", "no_inputs_dropout", "identity_multislice_dropout")
LORA_HALF = ("sigmoid_rank37_dropout",)  # fp16 and bf16 (storage types; the kernels compute in fp32)
# The tensor-core (WMMA) forward / dx / dW kernels, emulated by tests/cuda_emulation/shim/mma.h. fp32 (as
# TF32) only with activations whose fp32 value torch reproduces bit for bit (identity, leaky relu, relu):
# the forward rounds scale * act(h) to TF32, so the reference must compute it exactly as the kernel does;
# fp16 / bf16 tolerances absorb a one-ulp difference of sigmoid / tanh.
LORA_TENSOR_CORES = {
    "leaky_rank1": (torch.float32,),
    "sigmoid_rank37_dropout": (torch.float16, torch.bfloat16),
    "tanh_single_element_nobias": (torch.bfloat16,),
    "relu_rank64_dropout": (torch.float32,),
    "no_rows": (torch.float16,),
    "no_inputs_dropout": (torch.float32,),
    "identity_multislice_dropout": (torch.float32,),
    "leaky_rank70_two_output_tiles": (torch.float32, torch.bfloat16),
}
LORA_PARAMS = (
    [pytest.param(name, torch.float32, False, id=f"{name}-fp32") for name in LORA_CASES]
    + [pytest.param(name, torch.float64, False, id=f"{name}-fp64") for name in LORA_FP64]
    + [pytest.param(name, dtype, False, id=f"{name}-{str(dtype)[6:]}") for name in LORA_HALF
       for dtype in (torch.float16, torch.bfloat16)]
    + [pytest.param(name, dtype, True, id=f"{name}-{str(dtype)[6:]}-tensor_cores")
       for name, dtypes in LORA_TENSOR_CORES.items() for dtype in dtypes]
)


def dropout_mask(x: torch.Tensor, case: LoraCase) -> torch.Tensor:
    """The CPU extension's mask (the same Philox draw as the CUDA kernels), or ones without dropout."""
    if case.dropout_p == 0.0:
        return torch.ones_like(x)
    from stfast.ops import _ext

    status = _ext.status("cpu")
    if status is not True:
        pytest.skip(f"the CPU extension (dropout mask reference) is unavailable: {status}")
    return _ext.node_lora_dropout_mask(x, case.dropout_p, case.seed, case.offset)


def node_lora_reference(t: dict, mask: torch.Tensor, case: LoraCase) -> dict:
    """Forward, the low-rank intermediates and every gradient in float64 (autograd)."""
    x, w, la, lb, grad = (t[k].double().requires_grad_() for k in ("x", "weight", "lora_a", "lora_b", "grad"))
    b = (t["bias"].double() if case.bias else torch.zeros(case.O, dtype=torch.float64)).requires_grad_()
    h = torch.einsum("mnk,nkr->mnr", x * mask.double(), la)
    h.retain_grad()
    a = NODE_LORA_ACTIVATIONS[case.activation](h)
    y = x @ w.T + b + case.scale * torch.einsum("mnr,nro->mno", a, lb)
    y.backward(grad.detach())
    zeros = torch.zeros_like
    dh = h.grad if h.grad is not None else zeros(h)
    return {
        "y": y, "grad_h": dh, "scaled_a": case.scale * a, "mask": mask,
        "dx": x.grad if x.grad is not None else zeros(x),
        "d_lora_a": la.grad if la.grad is not None else zeros(la),
        "d_lora_b": lb.grad if lb.grad is not None else zeros(lb),
        "dw_weight": w.grad, "dw_bias": b.grad, "dw_full": torch.cat([w.grad, b.grad[:, None]], dim=1),
    }


def node_lora_tensor_core_reference(t: dict, mask: torch.Tensor, grad_h: torch.Tensor, case: LoraCase,
                                    dtype: torch.dtype) -> dict:
    """y, dx and dW / db as the tensor-core kernels compute them, from their MMA operands rounded as the
    kernels round them (tensor_core_operand), in float64 but for the forward's h (see below).

    dx takes the kernels' own grad_h (fp32, from the SIMT low-rank kernel), as the dx kernel does.
    """
    def op(v):
        return tensor_core_operand(v.float(), dtype)

    x32 = t["x"].float()
    mult = torch.where(mask != 0, torch.tensor(1.0 / (1.0 - case.dropout_p), dtype=torch.float32), 0.0)
    x_op, w_op, a_op, b_op, g_op = op(x32), op(t["weight"]), op(t["lora_a"]), op(t["lora_b"]), op(t["grad"])
    dropped_op = op(x32 * mult)  # drop(x) formed in fp32, then rounded
    # h as the emulated MMA forms it: exact products of the operands (fp32 holds them), summed in fp32 in
    # k order; then scale * act(h) in fp32, rounded to the operand type (a step the reference cannot
    # take from a differently rounded h).
    h = torch.zeros(case.M, case.N, case.R, dtype=torch.float32)
    for k in range(case.K):
        h = h + dropped_op[:, :, k, None].float() * a_op[None, :, k, :].float()
    scaled = torch.tensor(case.scale, dtype=torch.float32) * NODE_LORA_ACTIVATIONS[case.activation](h)
    y = x_op @ w_op.T + torch.einsum("mnr,nro->mno", op(scaled), b_op)
    if case.bias:
        y = y + t["bias"].double()
    lowrank_dx = torch.einsum("mnr,nkr->mnk", op(grad_h.reshape(case.M, case.N, case.R)), a_op)
    dx = lowrank_dx * mult.double() + g_op @ w_op
    g_rows, x_rows = g_op.reshape(case.M * case.N, case.O), x_op.reshape(case.M * case.N, case.K)
    dw = g_rows.T @ x_rows
    db = g_rows.sum(0)
    return {"y": y, "dx": dx, "dw_weight": dw, "dw_bias": db, "dw_full": torch.cat([dw, db[:, None]], dim=1)}


@pytest.mark.parametrize("name, dtype, tensor_cores", LORA_PARAMS)
def test_node_lora_kernels(harness, tmp_path, name, dtype, tensor_cores):
    case = LORA_CASES[name]
    M, N, K, O, R = case.M, case.N, case.K, case.O, case.R
    inputs = random_inputs(len(name), dtype, x=(M, N, K), weight=(O, K), bias=(O,), lora_a=(N, K, R),
                           lora_b=(N, R, O), grad=(M, N, O))
    if not case.bias:
        del inputs["bias"]
    mask = dropout_mask(inputs["x"], case)
    spec = {"op": "node_lora", "dtype": DTYPE_CODES[dtype], "M": M, "N": N, "K": K, "O": O, "R": R,
            "activation": case.activation, "scale": repr(case.scale), "dropout_p": repr(case.dropout_p),
            "seed": case.seed, "offset": case.offset, "bias": int(case.bias), "tensor_cores": int(tensor_cores),
            "shuffle_seed": 7}
    run = run_case(harness, tmp_path / "case", spec, inputs)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    outputs = {"y": dtype, "grad_h": acc, "scaled_a": acc, "dx": dtype, "d_lora_a": dtype, "d_lora_b": dtype,
               "dw_full": dtype, "dw_weight": dtype, "dw_bias": dtype, "mask": dtype}
    check_orders(run, [*outputs, "grad_h_only", "scaled_a_only", "dw_full_parts", "dw_weight_parts", "dw_bias_parts"])

    exact = node_lora_reference(inputs, mask, case)
    reference = dict(exact)
    if tensor_cores:
        reference.update(node_lora_tensor_core_reference(inputs, mask, run.get("grad_h", acc), case, dtype))
    for out, out_dtype in outputs.items():
        tol = 0.0 if out == "mask" else TOLERANCE[dtype]
        check_close(out, run.get(out, out_dtype), reference[out].detach(), tol)
    if tensor_cores and dtype == torch.float32 and M * N * K * O:
        # the operands' TF32 rounding shows beyond fp32 accuracy: these are the tensor-core kernels
        for out in ("y", "dx", "dw_weight"):
            error = (run.get(out, dtype).double() - exact[out].detach().reshape(-1)).abs().max()
            assert error > 10 * TOLERANCE[dtype] * max(1.0, exact[out].abs().max().item()), out
    # the CUDA mask is the CPU extension's, bit for bit
    assert torch.equal(run.get("mask", dtype), mask.reshape(-1))
    # the single-output variants of the low-rank kernel agree bitwise with the joint one
    assert run.orders("grad_h_only") == run.orders("grad_h")
    assert run.orders("scaled_a_only") == run.orders("scaled_a")
    if case.multi_slice:
        assert min(run.info[f"{v}_parts"] for v in ("dw_full", "dw_weight", "dw_bias")) > 1


# ---------------------------------------------------------------- meta_gconv

META_ACTIVATIONS = {0: lambda v: v, 1: torch.sigmoid, 2: torch.tanh}  # MetaGconvDims::activation


@dataclass(frozen=True)
class GconvCase:
    axis: str  # "ST": embeddings (B, N, D); "S": (N, D); "T": (B, D)
    B: int
    N: int
    I: int
    O: int
    D: int
    activation: int
    bias: bool = True
    multi_slice: bool = False  # dP over more than one row slice

    def embedding_shape_and_strides(self):
        B, N, D = self.B, self.N, self.D
        return {"ST": ((B, N, D), (N * D, D, 1)), "S": ((N, D), (0, D, 1)), "T": ((B, D), (D, 0, 1))}[self.axis]


GCONV_CASES = {
    "st_sigmoid_two_input_tiles": GconvCase("ST", 3, 7, 70, 67, 3, 1),
    "s_tanh_nobias": GconvCase("S", 2, 5, 9, 130, 2, 2, bias=False),
    "t_identity_multislice": GconvCase("T", 2, 300, 5, 3, 2, 0, multi_slice=True),
    "no_rows": GconvCase("ST", 0, 3, 4, 5, 2, 1),
    "no_inputs": GconvCase("S", 2, 3, 0, 4, 2, 2),
    # two d groups of the tensor-core dP (4 + 1), a partial i-chunk and a partial O chunk
    "st_tanh_five_dims": GconvCase("ST", 2, 9, 37, 33, 5, 2),
    # O a multiple of 16 bytes: the tensor-core forward stages P with cp.async (the others: plain loads)
    "st_identity_aligned_outputs": GconvCase("ST", 2, 5, 40, 72, 3, 0),
}
GCONV_FP64 = ("st_sigmoid_two_input_tiles", "t_identity_multislice")
# the tensor-core (WMMA) kernels, emulated by tests/cuda_emulation/shim/mma.h: fp32 as TF32, fp16, bf16
GCONV_TENSOR_CORES = {"st_sigmoid_two_input_tiles": (torch.float32, torch.float16, torch.bfloat16),
                      "s_tanh_nobias": (torch.float32,), "t_identity_multislice": (torch.float32, torch.bfloat16),
                      "no_rows": (torch.float16,), "no_inputs": (torch.float32,),
                      "st_tanh_five_dims": (torch.float32, torch.bfloat16),
                      "st_identity_aligned_outputs": (torch.float32, torch.float16, torch.bfloat16)}
GCONV_PARAMS = (
    [pytest.param(name, torch.float32, False, id=f"{name}-fp32") for name in GCONV_CASES]
    + [pytest.param(name, torch.float64, False, id=f"{name}-fp64") for name in GCONV_FP64]
    + [pytest.param("st_sigmoid_two_input_tiles", torch.float16, False, id="st_sigmoid_two_input_tiles-fp16")]
    + [pytest.param(name, dtype, True, id=f"{name}-{str(dtype)[6:]}-tensor_cores")
       for name, dtypes in GCONV_TENSOR_CORES.items() for dtype in dtypes]
)


def tensor_core_operand(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``v`` rounded as the tensor-core kernels round an MMA operand of storage ``dtype`` (float64).

    fp16 / bf16: to that type (nearest even); fp32: to TF32, 10 mantissa bits, to nearest with ties
    away from zero (``cvt.rna.tf32.f32``, what ``__float_to_tf32`` does).
    """
    if dtype != torch.float32:
        return v.to(dtype).double()
    bits = v.view(torch.int32)
    rounded = torch.where(v.isfinite(), (bits + 0x1000) & ~0x1FFF, bits)
    return rounded.view(torch.float32).double()


@pytest.mark.parametrize("name, dtype, tensor_cores", GCONV_PARAMS)
def test_meta_gconv_kernels(harness, tmp_path, name, dtype, tensor_cores):
    case = GCONV_CASES[name]
    M, I, O, D = case.B * case.N, case.I, case.O, case.D
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    emb_shape, (seb, sen, sed) = case.embedding_shape_and_strides()
    inputs = random_inputs(len(name), dtype, xg=(M, I), emb=emb_shape, pool=(D, I, O), bias_pool=(D, O))
    inputs["g"] = random_inputs(1, acc, g=(M, O))["g"]
    if not case.bias:
        del inputs["bias_pool"]
    spec = {"op": "meta_gconv", "dtype": DTYPE_CODES[dtype], "rows": M, "nodes": case.N, "inputs": I, "outputs": O,
            "dim": D, "stride_eb": seb, "stride_en": sen, "stride_ed": sed, "activation": case.activation,
            "bias": int(case.bias), "emb_count": inputs["emb"].numel(), "tensor_cores": int(tensor_cores),
            "shuffle_seed": 7}
    run = run_case(harness, tmp_path / "case", spec, inputs)
    check_orders(run, ["y", "dxg", "dxg_only", "de", "de_only", "dp", "dp_parts"])

    xg, pool, g = inputs["xg"].double(), inputs["pool"].double(), inputs["g"].double()
    rows = torch.arange(M)
    offsets = (rows // case.N) * seb + (rows % case.N) * sen
    emb = inputs["emb"].double().reshape(-1)[offsets[:, None] + torch.arange(D)[None, :] * sed]  # E (M, D)
    z = emb[:, :, None] * xg[:, None, :]  # (M, D, I), formed by the kernels in fp32 (exact for these inputs)
    z_op, pool_op, g_op = z, pool, g
    if tensor_cores:  # the MMA operands, rounded as the kernels round them
        z_op, pool_op, g_op = (tensor_core_operand(v.float(), dtype) for v in (z, pool, g))
    pre = torch.einsum("mdi,dio->mo", z_op, pool_op)
    if case.bias:
        pre = pre + emb @ inputs["bias_pool"].double()
    t_op = torch.einsum("mo,dio->mdi", g_op, pool_op)  # g @ P[d]^T per d
    reference = {
        "y": META_ACTIVATIONS[case.activation](pre),
        "dxg": torch.einsum("md,mdi->mi", emb, t_op),
        "de": torch.einsum("mi,mdi->md", xg, t_op),
        "dp": torch.einsum("mdi,mo->dio", z_op, g_op),
    }
    tol = TOLERANCE[dtype]
    for out, out_dtype in {"y": dtype, "dxg": dtype, "de": acc, "dp": dtype}.items():
        check_close(out, run.get(out, out_dtype), reference[out], tol)
    if tensor_cores and dtype == torch.float32 and M * I * O:
        # the operands' TF32 rounding shows beyond fp32 accuracy: these are the tensor-core kernels
        exact = META_ACTIVATIONS[case.activation](torch.einsum("mdi,dio->mo", z, pool) + (
            emb @ inputs["bias_pool"].double() if case.bias else 0))
        assert (run.get("y", dtype).double() - exact.reshape(-1)).abs().max() > 10 * TOLERANCE[dtype]
    # the tensor-core forward stages P asynchronously exactly when O is a multiple of 16 bytes
    aligned = O % (16 // inputs["pool"].element_size()) == 0
    assert (run.info["async_copies"] > 0) == (tensor_cores and aligned and M * I * D > 0)
    assert run.orders("dxg_only") == run.orders("dxg")
    assert run.orders("de_only") == run.orders("de")
    if case.multi_slice:
        assert run.info["dp_parts"] > 1


EXTENT_CASES = {  # (rows, nodes, I, O, D, embedding strides (b, n, d)), supported
    "himnet_pems07_b64": ((64 * 883, 883, 130, 128, 16, (883 * 16, 16, 1)), True),
    "largest_pool_matrix": ((4, 2, 2**15, 2**16 - 1, 1, (2, 1, 1)), True),
    "pool_matrix_2e31": ((4, 2, 2**15, 2**16, 1, (2, 1, 1)), False),
    "embedding_2e31_elements": ((2**21, 2**10, 4, 4, 2**10, (2**20, 2**10, 1)), True),  # last offset 2^31 - 1
    "embedding_beyond_2e31": ((2**21, 2**10, 4, 4, 2**10 + 1, (2**10 * (2**10 + 1), 2**10 + 1, 1)), False),
    "rows_near_2e31": ((2**31 - 32, 1, 1, 1, 1, (0, 1, 1)), False),
}


@pytest.mark.parametrize("name", EXTENT_CASES)
def test_meta_gconv_extents(harness, tmp_path, name):
    """The kernels index in 32 bits: the launchers refuse extents beyond that (cudaErrorInvalidValue = 1)
    before touching memory, and accept the largest benchmark shapes."""
    (rows, nodes, I, O, D, (seb, sen, sed)), supported = EXTENT_CASES[name]
    spec = {"op": "meta_gconv_extents", "rows": rows, "nodes": nodes, "inputs": I, "outputs": O, "dim": D,
            "stride_eb": seb, "stride_en": sen, "stride_ed": sed, "tensor_cores": 1, "shuffle_seed": 0}
    run = run_case(harness, tmp_path / "case", spec, {})
    assert run.info["supported"] == int(supported)
    if not supported:
        assert run.info["forward"] == run.info["dxg_de"] == run.info["dp"] == 1


def test_half_conversions(harness, tmp_path):
    """The emulator's fp16 / bf16 conversions round as torch does (to nearest even), both ways."""
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(4000, generator=gen) * torch.logspace(-9, 6, 4000),  # subnormal .. overflowing halves
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, -7e4, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1 + 2.0**-11,
                      1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, float("inf"), float("-inf"), 3e38]),
    ])
    run = run_case(harness, tmp_path / "case", {"op": "conversions", "count": values.numel(), "shuffle_seed": 0},
                   {"values": values})
    for name, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        want = values.to(dtype)
        assert torch.equal(run.get(name, torch.int16), want.view(torch.int16)), name
        assert torch.equal(run.get(f"{name}_back", torch.float32), want.float()), name


def test_launch_rewrite():
    """Every launch in csrc/cuda is rewritten, argument lists kept, line count unchanged."""
    for name in KERNEL_SOURCES:
        text = (CUDA_DIR / name).read_text()
        out = translate(CUDA_DIR / name)
        assert out.count("emu::Launch(") == text.count("<<<") > 0
        assert out.count("\n") == text.count("\n") + 1  # the #line directive
    assert rewrite_launches("k<<<1, 2>>>()") == ("emu::Launch(1, 2)(k)", 1)
    multi_line = rewrite_launches("ns::k<T><<<g, b, 0,\n s>>>(a,\n c);")
    assert multi_line == ("emu::Launch(g, b, 0,\n s)(ns::k<T>, a,\n c);", 1)
