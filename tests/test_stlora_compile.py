"""ST-LoRA's dropout under ``torch.compile(fullgraph=True)``: the seed lives on the device.

``stfast.ops.node_lora`` hands its custom op the dropout's ``(seed, offset)`` as an int64 tensor on
the input's device; the default seed is drawn there by torch's generator, never read on the host.
So a training step with dropout and the default seed traces into one graph (``fullgraph=True``
turns any graph break into an error), a new mask is drawn at every call of that graph (nothing
recompiles), and ``torch.manual_seed`` still makes a run reproducible. ``aot_eager`` traces the
joint forward/backward as inductor would (see tests/test_compile.py) without generating code.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from stfast import ops
from stfast.nn.stlora import NALL, NSP, SharedNALL
from stfast.ops.node_lora import dropout_seed

BACKENDS = ["torch", "cpu"]


def _grads(step, module, x):
    loss = step(x)
    return (loss.detach(),) + torch.autograd.grad(loss, [x, *module.parameters()])


def _compile_and_compare(module, x, backend):
    """Eager and compiled training steps from the same global RNG state: identical results (the
    seed is drawn by the same generator inside the graph); one frame serves every call."""

    def step(x):
        with ops.use_backend(backend):
            return module(x).square().mean()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    results = []
    for draw in (1, 2):
        torch.manual_seed(draw)
        expected = _grads(step, module, x)
        torch.manual_seed(draw)
        actual = _grads(compiled, module, x)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        results.append(actual)
    assert counter.frame_count == 1  # a new seed per call recompiles nothing
    assert not torch.equal(results[0][1], results[1][1])  # ... and draws a new mask: dx differs
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_type", [NALL, SharedNALL])
def test_adapter_with_dropout_and_the_default_seed_compiles_without_a_graph_break(backend, layer_type):
    torch.manual_seed(0)
    layer = layer_type(16, 12, num_nodes=5, rank=4, dropout=0.25).train()
    torch.nn.init.normal_(layer.lora_b)  # B = 0 at init would hide the low-rank path (and its mask)
    _compile_and_compare(layer, torch.randn(3, 5, 16, requires_grad=True), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_specific_predictor_training_step_compiles_without_a_graph_break(backend):
    torch.manual_seed(0)
    predictor = NSP(num_nodes=5, in_steps=4, in_dim=2, out_steps=3, out_dim=1, hidden=8, num_layers=2, rank=4,
                    dropout=0.2).train()
    for layer in (*predictor.layers, predictor.head):
        torch.nn.init.normal_(layer.lora_b)
    _compile_and_compare(predictor, torch.randn(2, 4, 5, 2, requires_grad=True), backend)


def test_default_seed_follows_torch_manual_seed_and_is_drawn_on_the_device():
    layer = NALL(8, 8, num_nodes=3, rank=2, dropout=0.5).train()
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(4, 3, 8)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the generator moved on: a new mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_tensor_gives_the_same_mask_as_the_same_int_seed(backend):
    layer = NALL(8, 8, num_nodes=3, rank=2, dropout=0.5).train()
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(4, 3, 8)
    with ops.use_backend(backend):
        by_int = layer(x, seed=11, offset=6)
        by_tensor = layer(x, seed=dropout_seed(11, 6, x.device))
    assert torch.equal(by_tensor, by_int)


@pytest.mark.parametrize("seed, offset, error, match", [
    (torch.zeros(3, dtype=torch.int64), 0, ValueError, r"seed: expected an int64 tensor of shape \(2,\) .*got dtype "
                                                        r"torch.int64 and shape \(3,\)"),
    (torch.zeros(2, dtype=torch.int32), 0, ValueError, r"seed: expected an int64 tensor .*got dtype torch.int32"),
    (torch.zeros(2, dtype=torch.int64, device="meta"), 0, ValueError, r"seed: expected a tensor on x's device cpu, "
                                                                       r"got meta"),
    (torch.zeros(2, dtype=torch.int64), 3, ValueError, r"offset: a seed tensor carries its own offset .*got 3"),
    (-1, 0, ValueError, r"seed: expected an int in \[0, 2\*\*62\), got -1"),
])
def test_bad_seeds_are_refused_naming_the_argument(seed, offset, error, match):
    layer = NALL(8, 8, num_nodes=3, rank=2, dropout=0.5).train()
    with pytest.raises(error, match=match):
        layer(torch.randn(4, 3, 8), seed=seed, offset=offset)
