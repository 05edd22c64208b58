"""Specification of ``stfast.published.load_published``: checkpoints of other code bases, built here from
their published key layouts (names and shapes as their modules register them), load strictly into
the zoo models through key maps, and anything that does not fit is refused before a tensor is copied.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stfast import models
from stfast.models.graph_ops import double_transition
from stfast.published import SOURCES, load_published

NODES = 207


def zoo(name: str):
    context = models.build_context(name, "METR-LA", synthetic_seed=0)
    return models.create(name, "METR-LA", backend="reference", context=context)


def numbered(shapes: dict) -> dict:
    """Distinct values per tensor, so a tensor landing under the wrong name is seen."""
    return {key: torch.full(shape, float(i)) + torch.rand(shape) * 0.01 for i, (key, shape) in enumerate(shapes.items())}


def staeformer_official_layout(layers: int = 3, dim: int = 152, ff: int = 256) -> dict:
    """XDZhelheim/STAEformer ``model/STAEformer.py`` state-dict keys of the METR-LA configuration."""
    shapes = {"input_proj.weight": (24, 3), "input_proj.bias": (24,), "adaptive_embedding": (12, NODES, 80),
              "tod_embedding.weight": (288, 24), "dow_embedding.weight": (7, 24),
              "output_proj.weight": (12, 12 * dim), "output_proj.bias": (12,)}
    for stack in ("attn_layers_t", "attn_layers_s"):
        for i in range(layers):
            prefix = f"{stack}.{i}."
            for proj in ("FC_Q", "FC_K", "FC_V", "out_proj"):
                shapes[f"{prefix}attn.{proj}.weight"], shapes[f"{prefix}attn.{proj}.bias"] = (dim, dim), (dim,)
            shapes[f"{prefix}feed_forward.0.weight"], shapes[f"{prefix}feed_forward.0.bias"] = (ff, dim), (ff,)
            shapes[f"{prefix}feed_forward.2.weight"], shapes[f"{prefix}feed_forward.2.bias"] = (dim, ff), (dim,)
            for norm in ("ln1", "ln2"):
                shapes[f"{prefix}{norm}.weight"], shapes[f"{prefix}{norm}.bias"] = (dim,), (dim,)
    return numbered(shapes)


def agcrn_basicts_layout() -> dict:
    """BasicTS ``baselines/AGCRN/arch`` state-dict keys of the METR-LA configuration (2 layers of 64, D=10, K=2)."""
    shapes = {"node_embeddings": (NODES, 10)}
    for i, dim_in in enumerate((2 + 64, 64 + 64)):
        shapes[f"encoder.dcrnn_cells.{i}.gate.weights_pool"] = (10, 2, dim_in, 128)
        shapes[f"encoder.dcrnn_cells.{i}.gate.bias_pool"] = (10, 128)
        shapes[f"encoder.dcrnn_cells.{i}.update.weights_pool"] = (10, 2, dim_in, 64)
        shapes[f"encoder.dcrnn_cells.{i}.update.bias_pool"] = (10, 64)
    shapes["end_conv.weight"], shapes["end_conv.bias"] = (12, 1, 1, 64), (12,)
    return numbered(shapes)


# ----------------------------------------------------------------------------------------------- STAEformer

def test_official_staeformer_keys_do_not_load_as_they_are():
    with pytest.raises(RuntimeError, match="attn_layers_t.0.attn.FC_Q.weight"):
        zoo("staeformer").model.load_state_dict(staeformer_official_layout(), strict=True)


def test_official_staeformer_checkpoint_loads_every_tensor_in_its_place(tmp_path):
    state = staeformer_official_layout()
    path = tmp_path / "STAEformer-METRLA.pt"
    torch.save(state, path)  # XDZhelheim/STAEformer train.py saves the bare state dict
    forecaster = zoo("staeformer")
    report = load_published(forecaster, path, source="staeformer")
    model = forecaster.model
    pairs = {
        "attn_layers_t.1.attn.FC_Q.weight": model.temporal_layers[1].attention.query.weight,
        "attn_layers_t.2.attn.FC_V.bias": model.temporal_layers[2].attention.value.bias,
        "attn_layers_s.0.attn.FC_K.weight": model.spatial_layers[0].attention.key.weight,
        "attn_layers_s.2.attn.out_proj.weight": model.spatial_layers[2].attention.out.weight,
        "attn_layers_s.1.ln1.weight": model.spatial_layers[1].norm1.weight,
        "attn_layers_t.0.ln2.bias": model.temporal_layers[0].norm2.bias,
        "attn_layers_t.0.feed_forward.2.weight": model.temporal_layers[0].feed_forward[2].weight,
        "adaptive_embedding": model.adaptive_embedding,
        "output_proj.weight": model.output_proj.weight,
    }
    for key, parameter in pairs.items():
        torch.testing.assert_close(parameter.detach(), state[key], rtol=0, atol=0, msg=key)
    assert report.renamed["attn_layers_t.1.ln1.weight"] == "temporal_layers.1.norm1.weight"
    assert len(report.renamed) == 2 * 3 * 16  # every layer key is renamed, the embeddings and heads are not
    x = torch.randn(2, 12, NODES, 3)
    x[..., 1], x[..., 2] = torch.rand(2, 12, NODES) * 0.99, torch.randint(0, 7, (2, 12, NODES)).float()
    assert torch.isfinite(model(x)).all()


def test_staeformer_parts_outside_the_published_configuration_are_refused():
    state = staeformer_official_layout()
    state["node_emb"] = torch.zeros(NODES, 8)  # spatial_embedding_dim > 0
    with pytest.raises(ValueError, match="'node_emb' from staeformer needs spatial_embedding_dim > 0"):
        load_published(zoo("staeformer"), state, source="staeformer")


def test_a_mismatched_checkpoint_loads_nothing_and_lists_the_differences():
    forecaster = zoo("staeformer")
    before = {k: v.clone() for k, v in forecaster.model.state_dict().items()}
    state = staeformer_official_layout()
    del state["attn_layers_s.2.ln2.bias"]
    state["output_proj.weight"] = torch.zeros(12, 10)
    with pytest.raises(ValueError, match=r"missing \['spatial_layers.2.norm2.bias'\].*output_proj.weight: "
                                         r"expected \(12, 1824\), got \(12, 10\)"):
        load_published(forecaster, state, source="staeformer")
    for key, value in forecaster.model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------------------------- BasicTS

def test_basicts_agcrn_runner_checkpoint_loads(tmp_path):
    state = agcrn_basicts_layout()
    with pytest.raises(RuntimeError, match="encoder.dcrnn_cells"):
        zoo("agcrn").model.load_state_dict(state, strict=True)
    path = tmp_path / "AGCRN_best_val_MAE.pt"
    torch.save({"epoch": 42, "model_state_dict": state, "optim_state_dict": {"state": {}, "param_groups": []},
                "best_metrics": {"val/MAE": 2.9}}, path)  # the BasicTS runner's dict
    forecaster = zoo("agcrn")
    load_published(forecaster, path, source="basicts")
    model = forecaster.model
    torch.testing.assert_close(model.cells[1].update.weights_pool.detach(),
                               state["encoder.dcrnn_cells.1.update.weights_pool"], rtol=0, atol=0)
    torch.testing.assert_close(model.node_embeddings.detach(), state["node_embeddings"], rtol=0, atol=0)
    torch.testing.assert_close(model.end_conv.weight.detach(), state["end_conv.weight"], rtol=0, atol=0)


def test_dataparallel_prefix_is_dropped():
    state = {f"module.{k}": v for k, v in agcrn_basicts_layout().items()}
    forecaster = zoo("agcrn")
    load_published(forecaster, state, source="torch-mts")
    torch.testing.assert_close(forecaster.model.cells[0].gate.bias_pool.detach(),
                               state["module.encoder.dcrnn_cells.0.gate.bias_pool"], rtol=0, atol=0)


def test_basicts_gwnet_runs_on_the_transposed_supports_basicts_trained_with():
    torch.manual_seed(0)
    adjacency = (np.random.default_rng(0).random((NODES, NODES)) < 0.05).astype(np.float32)
    context = models.build_context("gwnet", "METR-LA", synthetic_seed=0)
    context.adjacency = adjacency
    source = models.create("gwnet", "METR-LA", context=context)
    state = source.model.state_dict()  # BasicTS's GWNet registers the same names as stfast's
    loaded = models.create("gwnet", "METR-LA", context=context)
    report = load_published(loaded, state, source="basicts")
    assert any("transposed" in note for note in report.notes)
    expected_supports = torch.stack([torch.as_tensor(s.T, dtype=torch.float32) for s in double_transition(adjacency)])
    torch.testing.assert_close(loaded.model.supports, expected_supports, rtol=0, atol=0)

    reference = models.gwnet.GWNET(supports=[s.T for s in double_transition(adjacency)],
                                   **models.gwnet.config("METR-LA")["model"])
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, 12, NODES, 2)
    loaded.model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- bad input

def test_unknown_sources_and_models_are_named():
    with pytest.raises(ValueError, match=r"source: expected one of \['basicts', 'torch-mts'\] for agcrn, got 'tsl'"):
        load_published(zoo("agcrn"), {}, source="tsl")
    with pytest.raises(ValueError, match="model: expected a stfast zoo model"):
        load_published(torch.nn.Linear(2, 2), {}, source="basicts")


class _Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_files_that_carry_code_are_refused_without_running_it(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_published(zoo("stid"), path, source="basicts")
    assert "executed" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file"):
        load_published(zoo("stid"), tmp_path / "absent.pt", source="basicts")
    with pytest.raises(ValueError, match="non-tensor entries"):
        load_published(zoo("stid"), {"node_emb": [1, 2]}, source="basicts")


def test_every_source_names_a_zoo_model():
    for name, _ in SOURCES:
        assert name in models.available()
