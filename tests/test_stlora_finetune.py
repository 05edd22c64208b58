"""Fine-tuning ST-LoRA on a pretrained backbone (``stfast train --stlora --init-from ... --freeze-backbone``):
what ``--init-from`` accepts (stfast checkpoints of the backbone or of an ST-LoRA run, plain state
dicts) and refuses (another model, dataset or configuration, files that are not weights, pickled
code, which must not run), the gate's L2 penalty in the training loss, and the whole workflow on the
real PEMS08 prefix through the command line: backbone, fine-tuning, ``stfast eval``."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stfast import models
from stfast.data import load_dataset, synthetic_batch
from stfast.metrics import get_loss
from stfast.nn.stlora import wrap_forecaster
from stfast.training.finetune import BackboneGuard, backbone_of, init_backbone
from stfast.training.step import make_optimizer, predict, train_step
from stfast.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_HIMNET = dict(hidden_dim=4, tod_embedding_dim=2, dow_embedding_dim=2, node_embedding_dim=2, st_embedding_dim=2)
STLORA = dict(hidden=8, rank=4, num_layers=1)


def tiny_himnet(dataset="PEMS08", seed=0, **overrides):
    torch.manual_seed(seed)
    return models.create("himnet", dataset, backend="torch", **{**TINY_HIMNET, **overrides})


def save_best(forecaster, dataset, folder) -> Path:
    """``best.pt`` as the trainer writes it for ``forecaster`` trained on ``dataset``."""
    data = load_dataset(dataset, synthetic=True, num_steps=40)
    Trainer(forecaster, data, forecaster.config["training"], out_dir=folder, progress=False).save_best()
    return Path(folder) / "best.pt"


def assert_same_tensors(module, reference):
    mine, theirs = module.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


# ---------------------------------------------------------------- what --init-from reads


def test_init_from_an_stfast_checkpoint_a_stlora_checkpoint_and_a_plain_state_dict(tmp_path):
    pretrained = tiny_himnet(seed=0)
    best = save_best(pretrained, "PEMS08", tmp_path / "backbone")
    plain = tmp_path / "plain.pt"
    torch.save(pretrained.model.state_dict(), plain)
    wrapped_run = wrap_forecaster(tiny_himnet(seed=0), **STLORA)
    stlora_best = save_best(wrapped_run, "PEMS08", tmp_path / "stlora")

    for path, kind in ((best, "stfast checkpoint"), (plain, "state dict"), (stlora_best, "stfast checkpoint")):
        target = wrap_forecaster(tiny_himnet(seed=1), freeze_backbone=True, **STLORA)
        assert not torch.equal(target.model.backbone.node_embedding, pretrained.model.node_embedding)
        message = init_backbone(target, path, dataset="PEMS08")
        assert kind in message and str(path) in message
        assert_same_tensors(backbone_of(target), pretrained.model)

    unwrapped = tiny_himnet(seed=2)  # without --stlora the model itself is initialised
    init_backbone(unwrapped, best, dataset="PEMS08")
    assert_same_tensors(unwrapped.model, pretrained.model)


def test_init_from_refuses_another_dataset_model_or_configuration(tmp_path):
    target = wrap_forecaster(tiny_himnet(), **STLORA)
    other_dataset = save_best(tiny_himnet("PEMS04"), "PEMS04", tmp_path / "pems04")
    with pytest.raises(ValueError, match=r"--init-from: .* holds dataset 'PEMS04', this run needs 'PEMS08'"):
        init_backbone(target, other_dataset, dataset="PEMS08")
    other_config = save_best(tiny_himnet(hidden_dim=6), "PEMS08", tmp_path / "wide")
    with pytest.raises(ValueError, match=r"other model arguments \(hidden_dim: 6 there, 4 here\)"):
        init_backbone(target, other_config, dataset="PEMS08")
    wrong_shapes = tmp_path / "wrong.pt"
    torch.save(tiny_himnet("PEMS04").model.state_dict(), wrong_shapes)  # 307 nodes, not 170
    with pytest.raises(ValueError, match=r"--init-from: .*weights of another model: .*of another shape .*"
                                         r"node_embedding: \(307, 2\) vs the model's \(170, 2\).*"
                                         r"\(himnet on PEMS08 expected\)"):
        init_backbone(target, wrong_shapes, dataset="PEMS08")
    partial = tmp_path / "partial.pt"
    torch.save({"node_embedding": torch.zeros(170, 2)}, partial)
    with pytest.raises(ValueError, match=r"missing"):
        init_backbone(target, partial, dataset="PEMS08")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_init_from_refuses_files_that_are_not_weights_and_never_runs_their_code(tmp_path):
    target = wrap_forecaster(tiny_himnet(), **STLORA)
    not_weights = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_weights)
    with pytest.raises(ValueError, match=r"expected an stfast checkpoint or a plain state dict \{name: tensor\}"):
        init_backbone(target, not_weights, dataset="PEMS08")
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    with open(crafted, "wb") as f:
        pickle.dump({"node_embedding": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="checkpoint: .*crafted.pt"):
        init_backbone(target, crafted, dataset="PEMS08")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="--init-from: no such file"):
        init_backbone(target, tmp_path / "absent.pt", dataset="PEMS08")


# ---------------------------------------------------------------- training only the adapters


def test_frozen_fine_tuning_step_trains_adapters_only_and_pays_the_gate_penalty():
    batch, scaler = synthetic_batch("PEMS08", 2, return_scaler=True)
    wrapped = wrap_forecaster(tiny_himnet(), freeze_backbone=True, gate_l2=0.5, **STLORA)
    with torch.no_grad():
        wrapped.model.gate.fill_(0.2)
    guard = BackboneGuard(backbone_of(wrapped))
    optimizer, _ = make_optimizer(wrapped, wrapped.config["training"])
    loss_fn = get_loss(wrapped.config["training"]["loss"])
    wrapped.train()
    torch.manual_seed(1)  # teacher forcing draws from the global generator: the same draws twice
    with torch.no_grad():
        expected = loss_fn(predict(wrapped, batch, scaler, batches_seen=0), batch.y) + 0.5 * 0.2**2 * 170 * 12
    torch.manual_seed(1)
    loss = train_step(wrapped, batch, optimizer, loss_fn, scaler, batches_seen=0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    assert not torch.equal(wrapped.model.gate, torch.full_like(wrapped.model.gate, 0.2))
    assert guard.check().startswith("frozen backbone bitwise unchanged")
    with torch.no_grad():
        next(backbone_of(wrapped).parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="frozen backbone: 1 tensor\\(s\\) changed"):
        guard.check()


# ---------------------------------------------------------------- the workflow, end to end


def stfast(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "stfast", *args], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


E2E_MODEL = "stgcn"


def test_fine_tuning_workflow_on_the_real_pems08_prefix(tmp_path, pems08_prefix, shared_file):
    """Backbone for one (shortened) epoch, then ST-LoRA fine-tuning on it with the backbone frozen,
    then ``stfast eval`` of the fine-tuned checkpoint."""
    graph = shared_file("PEMS08/PEMS08.csv")
    common = ["--model", E2E_MODEL, "--dataset", "PEMS08", "--data", str(pems08_prefix), "--graph", str(graph),
              "--device", "cpu",
              "--epochs", "1", "--max-batches-per-epoch", "2", "--batch-size", "8", "--no-progress"]
    stfast("train", *common, "--out", str(tmp_path / "backbone"))
    backbone = torch.load(tmp_path / "backbone" / "best.pt", weights_only=True)["model"]

    out = stfast("train", *common, "--out", str(tmp_path / "stlora"), "--stlora", "--stlora-adapter", "shared",
                 "--init-from", str(tmp_path / "backbone" / "best.pt"), "--freeze-backbone")
    assert "initialised the" in out and "(stfast checkpoint," in out
    assert "frozen backbone bitwise unchanged" in out
    tuned = torch.load(tmp_path / "stlora" / "best.pt", weights_only=True)
    assert tuned["stlora"]["freeze_backbone"] and tuned["stlora"]["adapter"] == "shared"
    assert all(torch.equal(tuned["model"]["backbone." + k], v) for k, v in backbone.items())
    assert torch.count_nonzero(tuned["model"]["gate"]) > 0  # the adapters did train

    metrics = tmp_path / "eval.json"
    stfast("eval", "--checkpoint", str(tmp_path / "stlora" / "best.pt"), "--device", "cpu", "--max-batches", "2",
           "--json", str(metrics))
    assert set(json.loads(metrics.read_text())) == {"horizon_3", "horizon_6", "horizon_12", "average"}


@pytest.mark.parametrize("extra, message", [
    (["--freeze-backbone"], "--freeze-backbone: only with --stlora"),
    (["--stlora", "--init-from", "absent.pt"], "--init-from: no such file absent.pt"),
])
def test_fine_tuning_flags_are_checked_before_anything_loads(extra, message, capsys, tmp_path, monkeypatch):
    from stfast import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", "stid", "--dataset", "PEMS08", "--synthetic", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
