"""The boundary fuzz of every op on every backend this machine runs, as a script (issue 14).

Run by ``tests/test_fuzz_boundaries.py`` in a subprocess with ``TRITON_INTERPRET=1``, so that a
crash (a signal) fails that test instead of killing pytest. Cases: every dimension of each op set to
0 and to 1 in turn, all of them 1, the activations and graph kinds, float32 / float64 / float16
(bfloat16 off the interpreter: its ``tl.dot`` is wrong there, see DESIGN.md), non-contiguous
weights and inputs, and the C++ extension's own ops called directly with zero-sized dimensions.

Each case ends in one of:

- ``ok``: output and every gradient match the torch backend run in float64 on the same (rounded)
  inputs (max |diff| / max |reference| within the dtype's tolerance; NaN / inf where the reference
  has them and nowhere else);
- ``refused``: a ``ValueError`` / ``TypeError`` whose message starts by naming the argument or op
  (``"x: expected ..."``), for an input the torch backend refuses too, or a dtype the backend says it
  does not compute;
- anything else is a failure: ``mismatch``, ``unclear error`` or ``inconsistent`` (refused here,
  computed by torch).

Prints one line per case as it starts (``case <label>``: the last one names a crash) and a JSON
summary on the last line.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch  # noqa: E402

from stfast import ops  # noqa: E402
from stfast.ops import backends  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CLEAR = re.compile(r"^(stfast_ext::)?[A-Za-z_][\w]*: ")


# ---------------------------------------------------------------- inputs

def _random(shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.5


def meta_gconv_inputs(sizes, axis, graph, cheb_k, seed=0):
    b, n, c, d, o = (sizes[k] for k in "BNCDO")
    g = torch.Generator().manual_seed(seed)
    supports = {"none": None, "shared": torch.rand(n, n, generator=g, dtype=torch.float64) / max(n, 1),
                "per_sample": torch.rand(b, n, n, generator=g, dtype=torch.float64) / max(n, 1)}[graph]
    embeddings = _random({"S": (n, d), "T": (b, d), "ST": (b, n, d)}[axis], g)
    return [_random((b, n, c), g), supports, embeddings, _random((d, cheb_k * c, o), g), _random((d, o), g)]


def node_lora_inputs(lead, n, k, o, r, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_random((*lead, n, k), g), _random((o, k), g), _random((o,), g) if bias else None,
            _random((n, k, r), g), _random((n, r, o), g)]


def _non_contiguous(t):
    """The same values through a transposed view (strides differ, contents equal)."""
    if t is None or t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# ---------------------------------------------------------------- running one case

def _run(call, inputs, dtype, layout):
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
    # "strided": every input through a transposed view; "strided weights": all but x (meta_gconv asks
    # for a contiguous x and says so).
    used = [t if t is None or layout == "contiguous" or (layout == "strided weights" and i == 0) else
            _non_contiguous(t) for i, t in enumerate(leaves)]
    out = call(*used)
    wanted = [t for t in leaves if t is not None]
    # positive, so that no gradient (the bias's: a sum of grad_out) is zero by cancellation
    grad_out = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape).to(dtype)
    grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if out.numel() or wanted else ()
    found = iter(grads)
    return [out.detach()] + [None if t is None else next(found) for t in leaves]


def _relative_error(got, want):
    if got is None or want is None:
        return 0.0 if got is None and (want is None or not want.abs().sum()) else float("inf")
    if got.shape != want.shape:
        return float("inf")
    got = got.double()
    if not torch.equal(torch.isnan(got), torch.isnan(want)) or not torch.equal(torch.isinf(got), torch.isinf(want)):
        return float("inf")
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    diff = (got - want)[finite].abs().max().item()
    return diff / max(want[finite].abs().max().item(), 1e-30)


def _outcome(error, reference_error):
    clear = isinstance(error, (ValueError, TypeError)) and CLEAR.match(str(error))
    if not clear:
        return "unclear error"
    if "does not compute" in str(error) or reference_error is not None:
        return "refused"
    return "inconsistent"


def check_case(label, call, inputs, dtype, layout, backend, results):
    print(f"case {label}", flush=True)
    rounded = [None if t is None else t.to(dtype).double() for t in inputs]
    try:
        with ops.use_backend("torch"):
            reference = _run(call, rounded, torch.float64, "contiguous")
        reference_error = None
    except (ValueError, TypeError) as error:
        reference, reference_error = None, error
    try:
        with ops.use_backend(backend):
            got = _run(call, rounded, dtype, layout)
    except Exception as error:  # noqa: BLE001 - classified below
        results.append((label, _outcome(error, reference_error), f"{type(error).__name__}: {error}"[:300]))
        return
    if reference is None:
        results.append((label, "inconsistent", f"computed here, refused by torch: {reference_error}"[:300]))
        return
    worst = max(_relative_error(g, w) for g, w in zip(got, reference))
    results.append((label, "ok" if worst <= TOLERANCE[dtype] else "mismatch", f"max rel err {worst:.3g}"))


# ---------------------------------------------------------------- the cases

def _edge_sizes(base):
    """``base``, every size set to 0 and to 1 in turn, and all sizes 1."""
    yield "base", dict(base)
    for key in base:
        for value in (0, 1):
            yield f"{key}={value}", {**base, key: value}
    yield "ones", {key: 1 for key in base}


def meta_gconv_cases(backend, dtypes):
    base = {"B": 2, "N": 3, "C": 2, "D": 2, "O": 3}
    for axis in ("S", "T", "ST"):
        for graph, cheb_k in (("none", 1), ("shared", 2), ("per_sample", 3)):
            for name, sizes in _edge_sizes(base):
                if axis != "ST" and sizes["B"] == sizes["N"]:
                    continue  # a 2-D embedding would be ambiguous (the op asks for the axis); tested elsewhere
                for dtype in dtypes:
                    if dtype in (torch.float16, torch.bfloat16) and (graph, name) not in (("shared", "base"),
                                                                                           ("shared", "ones")):
                        continue
                    activation = {"none": None, "shared": "tanh", "per_sample": "sigmoid"}[graph]
                    inputs = meta_gconv_inputs(sizes, axis, graph, cheb_k)

                    def call(x, a, e, p, pb, cheb_k=cheb_k, activation=activation, axis=axis):
                        return ops.meta_gconv(x, a, e, p, pb, cheb_k, activation, axis=axis)

                    label = f"meta_gconv {backend} {axis} {graph} {name} {str(dtype)[6:]}"
                    yield label, call, inputs, dtype


def node_lora_cases(backend, dtypes):
    shapes = [("base", (2,), 3, 4, 5, 2), ("M=0", (0,), 3, 4, 5, 2), ("M=1", (1,), 3, 4, 5, 2),
              ("lead=()", (), 3, 4, 5, 2), ("lead=(2,0,3)", (2, 0, 3), 3, 4, 5, 2), ("N=0", (2,), 0, 4, 5, 2),
              ("N=1", (2,), 1, 4, 5, 2), ("d_in=0", (2,), 3, 0, 5, 2), ("d_in=1", (2,), 3, 1, 5, 2),
              ("d_out=0", (2,), 3, 4, 0, 2), ("d_out=1", (2,), 3, 4, 1, 2), ("r=0", (2,), 3, 4, 5, 0),
              ("r=1", (2,), 3, 4, 5, 1), ("ones", (1,), 1, 1, 1, 1)]
    for name, lead, n, k, o, r in shapes:
        for activation in ("relu", "sigmoid", "leaky_relu", "tanh", None):
            for dtype in dtypes:
                if dtype in (torch.float16, torch.bfloat16) and name not in ("base", "ones"):
                    continue
                bias = activation != "tanh"
                inputs = node_lora_inputs(lead, n, k, o, r, bias)

                def call(x, w, b, a, bb, activation=activation):
                    return ops.node_lora(x, w, b, a, bb, 0.5, activation)

                yield f"node_lora {backend} {name} {activation} bias={bias} {str(dtype)[6:]}", call, inputs, dtype


def _extension_calls():
    """``(label, function, args)`` for the C++ ops with each size of the problem 0 or 1 in turn."""
    from stfast.ops import _ext

    for name, sizes in _edge_sizes({"B": 2, "N": 3, "C": 2, "D": 2, "O": 3}):
        x, a, e, p, pb = (t.float() for t in meta_gconv_inputs(sizes, "ST", "shared", 2))
        grad = torch.ones(sizes["B"], sizes["N"], sizes["O"])
        yield f"stfast_ext.meta_gconv_fwd {name}", _ext.meta_gconv_forward, (x, a, e, p, pb, 2, None, "ST")
        yield (f"stfast_ext.meta_gconv_bwd {name}", _ext.meta_gconv_backward,
               (grad, None, x, a, e, p, pb, 2, None, "ST", [True] * 5))
    for name, sizes in _edge_sizes({"M": 2, "N": 3, "K": 4, "O": 5}):
        x, w, b, a, bb = (t.float() for t in node_lora_inputs((sizes["M"],), sizes["N"], sizes["K"], sizes["O"], 2,
                                                             True))
        grad = torch.ones(sizes["M"], sizes["N"], sizes["O"])
        seed = torch.zeros(2, dtype=torch.int64)
        yield f"stfast_ext.node_lora_fwd {name}", _ext.node_lora_forward, (x, w, b, a, bb, 0.5, "relu", 0.0, seed)
        yield (f"stfast_ext.node_lora_bwd {name}", _ext.node_lora_backward,
               (grad, x, w, b, a, bb, 0.5, "relu", 0.0, seed, [True] * 5))


def extension_direct_cases(results):
    """The C++ ops called directly: a zero-sized dimension is refused clearly, never a crash."""
    from stfast.ops import _ext

    if _ext.status("cpu") is not True:
        return
    for label, function, args in _extension_calls():
        print(f"case {label}", flush=True)
        try:
            function(*args)
            results.append((label, "ok", "computed"))
        except Exception as error:  # noqa: BLE001 - classified below
            clear = isinstance(error, (ValueError, TypeError)) and CLEAR.match(str(error))
            results.append((label, "refused" if clear else "unclear error", str(error)[:300]))


def main(argv) -> int:
    chosen = argv[1:] or ["torch", "cpu", "triton"]
    device = torch.device("cpu")
    results, skipped = [], {}
    for backend in chosen:
        ready = backends.available_backends(device, "node_lora")[backend]
        if ready is not True:
            skipped[backend] = ready
            continue
        dtypes = [torch.float32, torch.float64, torch.float16]
        if backend != "triton":
            dtypes.append(torch.bfloat16)
        for label, call, inputs, dtype in list(meta_gconv_cases(backend, dtypes)) + list(node_lora_cases(backend,
                                                                                                         dtypes)):
            layout = "contiguous" if " base " not in label else "strided" if "node_lora" in label else "strided weights"
            check_case(label, call, inputs, dtype, layout, backend, results)
    extension_direct_cases(results)
    counts = {}
    for _, outcome, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    failures = [r for r in results if r[1] not in ("ok", "refused")]
    print(json.dumps({"counts": counts, "skipped": skipped, "failures": failures,
                      "refusals": sorted({r[2][:120] for r in results if r[1] == "refused"})}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
