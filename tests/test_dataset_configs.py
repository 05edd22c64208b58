"""Every zoo model has a configuration on every dataset: the published one where its paper or
official code gives it (source named), else its reference hyper-parameters with the dataset's shape,
marked as such."""

import pytest

from stfast import configs, models
from stfast.models.dataset_configs import PUBLISHED, SHAPE_DEFAULTS, for_dataset

PAIRS = [(model, dataset) for model in models.available() for dataset in configs.DATASETS]


@pytest.mark.parametrize("model, dataset", PAIRS)
def test_every_model_has_a_marked_configuration_on_every_dataset(model, dataset):
    config = configs.load(model, dataset)
    info = configs.DATASETS[dataset]
    assert config["model"]["num_nodes"] == info.num_nodes
    assert config["origin"] in (PUBLISHED, SHAPE_DEFAULTS)
    assert config["source"]  # where the numbers come from, or which ones were reused
    if config["origin"] == SHAPE_DEFAULTS:
        assert f"no published {dataset} configuration" in config["source"]
    assert {"batch_size", "max_epochs", "lr", "milestones", "loss", "clip_grad"} <= set(config["training"])


def test_the_torch_mts_datasets_are_published_for_its_models():
    torch_mts = ["agcrn", "dcrnn", "gts", "gwnet", "lstm", "megacrn", "stgcn", "stid", "stnorm", "stwa"]
    for model in torch_mts + ["himnet", "staeformer"]:
        for dataset in ("METR-LA", "PEMS-BAY", "PEMS03", "PEMS04", "PEMS07", "PEMS08"):
            assert configs.load(model, dataset)["origin"] == PUBLISHED, (model, dataset)


def test_models_whose_published_recipes_stfast_cannot_follow_are_marked_as_defaults():
    for model in ("pdformer", "d2stgnn"):
        assert configs.load(model, "METR-LA")["origin"] == PUBLISHED
        assert configs.load(model, "PEMS04")["origin"] == SHAPE_DEFAULTS
    assert configs.load("lstm_largest", "METR-LA")["origin"] == SHAPE_DEFAULTS
    assert configs.load("himnet", "SD")["origin"] == SHAPE_DEFAULTS


def test_published_per_dataset_values_follow_their_sources():
    # Torch-MTS configs/AGCRN.yaml: no time of day on PEMS0x, embed_dim 2 on PEMS08.
    agcrn = configs.load("agcrn", "PEMS08")
    assert agcrn["model"]["input_dim"] == 1 and agcrn["x_channels"] == (0,) and agcrn["model"]["embed_dim"] == 2
    assert models.create("agcrn", "PEMS08").spec.x_channels == (0,)
    assert models.create("agcrn", "METR-LA").spec.x_channels == (0, 1)
    pems04 = configs.load("agcrn", "PEMS04")["training"]
    assert (pems04["lr"], pems04["milestones"], pems04["lr_decay_rate"]) == (3e-3, [50], 0.3)
    # Torch-MTS configs/GTS.yaml: dim_fc = 16 * (train_steps - 18) is 162,832 on PEMS04, k 30.
    gts = configs.load("gts", "PEMS04")["model"]
    assert 16 * (gts["train_steps"] - 18) == 162_832 and gts["k"] == 30
    assert configs.load("stid", "PEMS04")["training"]["loss"] == "masked_mae"
    assert configs.load("dcrnn", "PEMS03")["training"]["clip_grad"] == 0.0
    assert configs.load("staeformer", "PEMS08")["training"]["weight_decay"] == 1.5e-3
    # Without a published table: the METR-LA hyper-parameters, the dataset's node count and loss.
    reused, reference = configs.load("dcrnn", "SD"), configs.load("dcrnn", "METR-LA")
    assert reused["training"]["lr"] == reference["training"]["lr"]
    assert reused["training"]["loss"] == configs.DATASETS["SD"].loss


def test_a_table_entry_naming_no_argument_is_refused():
    reference = {"model": {"num_nodes": 3}, "training": {"lr": 1.0}}
    with pytest.raises(KeyError, match=r"unknown model key\(s\) \['hiden'\]"):
        for_dataset("PEMS04", reference, {"PEMS04": {"model": {"hiden": 4}}}, "a table")
