"""A training step that a CUDA graph can capture: ``torch.compile(fullgraph=True)`` on CPU.

``fullgraph=True`` turns every graph break into an error, so a compile that succeeds proves that
the forward (and, through AOTAutograd, the backward) has no host-device synchronisation, no
data-dependent shape and no Python-side read of a device value. The ``aot_eager`` backend traces
exactly what inductor would (dynamo, then AOTAutograd's joint forward/backward graph through the
custom ops' fake kernels) but skips code generation, so these tests stay fast; the inductor cost is
measured in ``bench/himnet_step.py --modes eager compile``.
"""

import numpy as np
import pytest
import torch

from stfast import models, ops
from stfast.nn import HimNet
from stfast.nn.stlora import NALL

TINY_HIMNET = dict(num_nodes=7, input_dim=3, output_dim=1, out_steps=2, hidden_dim=8, cheb_k=2, ycov_dim=2,
                   tod_embedding_dim=4, dow_embedding_dim=4, node_embedding_dim=4, st_embedding_dim=4)


def himnet_inputs(batch=2, steps=2, nodes=7):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, steps, nodes, 3, generator=generator)
    x[..., 1] = torch.rand(batch, steps, nodes, generator=generator)
    x[..., 2] = torch.randint(0, 7, (batch, steps, nodes), generator=generator).float()
    y_cov = torch.rand(batch, 2, nodes, 2, generator=generator)
    labels = torch.randn(batch, 2, nodes, 1, generator=generator)
    return x, y_cov, labels


def loss_and_grads(step, model, *inputs):
    loss = step(*inputs)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


# The op backend only changes what runs inside the custom ops, which tracing sees through their fake
# kernels: the joint forward/backward trace (aot_eager) runs once, on the CPU default backend; the
# torch backend (the GPU default) is checked with dynamo alone.
@pytest.mark.parametrize("backend, compiler", [("cpu", "aot_eager"), ("torch", "eager")])
def test_fused_himnet_training_forward_and_backward_compile_without_a_graph_break(backend, compiler):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = HimNet(**TINY_HIMNET).train()
    x, y_cov, labels = himnet_inputs()

    def training_loss(x, y_cov, labels, forcing):
        with ops.use_backend(backend):
            return model(x, y_cov, labels, teacher_forcing=forcing).square().mean()

    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(training_loss, fullgraph=True, backend=counter)
    for forcing in (torch.tensor([True, False]), torch.tensor([False, True])):
        expected_loss, expected_grads = loss_and_grads(training_loss, model, x, y_cov, labels, forcing)
        loss, grads = loss_and_grads(compiled, model, x, y_cov, labels, forcing)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        for grad, expected in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert counter.frame_count == 1  # one static graph serves every teacher-forcing draw: nothing recompiles


def test_device_side_teacher_forcing_equals_the_published_host_side_draws():
    torch.manual_seed(0)
    model = HimNet(**{**TINY_HIMNET, "tf_decay_steps": 3}).train()
    x, y_cov, labels = himnet_inputs()
    for batches_seen in (0, 4, 9):  # thresholds 0.75, 0.27, 0.14: forced and free steps both occur
        np.random.seed(batches_seen)
        host = model(x, y_cov, labels, batches_seen)
        np.random.seed(batches_seen)
        device = model(x, y_cov, labels, teacher_forcing=model.draw_teacher_forcing(batches_seen))
        torch.testing.assert_close(device, host, rtol=0, atol=0)


def test_teacher_forcing_mask_is_checked():
    model = HimNet(**TINY_HIMNET).train()
    x, y_cov, labels = himnet_inputs()
    with pytest.raises(TypeError, match=r"teacher_forcing: expected a bool tensor of shape \(2,\)"):
        model(x, y_cov, labels, teacher_forcing=[True, False])
    with pytest.raises(ValueError, match=r"teacher_forcing: expected a bool tensor of shape \(2,\).*got shape \(3,\)"):
        model(x, y_cov, labels, teacher_forcing=torch.tensor([True, False, True]))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_node_lora_with_dropout_and_an_explicit_seed_compiles_without_a_graph_break(backend):
    torch.manual_seed(0)
    layer = NALL(16, 16, num_nodes=5, rank=4, dropout=0.25).train()
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def training_loss(x, seed):
        with ops.use_backend(backend):
            return layer(x, seed=seed).square().mean()

    compiled = torch.compile(training_loss, fullgraph=True, backend="aot_eager", dynamic=False)
    expected = torch.autograd.grad(training_loss(x, 7), [x, layer.lora_a])
    actual = torch.autograd.grad(compiled(x, 7), [x, layer.lora_a])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_forecaster_compile_keeps_the_state_dict_and_the_training_forward():
    from stfast.data import synthetic_batch

    forecaster = models.create("himnet", "METR-LA", backend="cpu", **{**TINY_HIMNET, "num_nodes": 207})
    keys = list(forecaster.state_dict())
    batch = synthetic_batch("METR-LA", 2, seed=0, in_steps=2, out_steps=2)
    labels = batch.y / 70.0
    forecaster.train()
    np.random.seed(3)
    torch.manual_seed(0)
    eager = forecaster(batch, labels=labels, batches_seen=100)
    forecaster.compile(backend="eager", fullgraph=True)
    assert list(forecaster.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints stay loadable
    np.random.seed(3)
    compiled = forecaster(batch, labels=labels, batches_seen=100)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
