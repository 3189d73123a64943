"""The resolved configuration: every flag is a config field, resolving has no side effects, the
recipes in recipes/ all resolve, flags override a recipe, and a run's written config runs it again."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

import main_detection
import main_finetune
import main_pretrain
import main_segmentation
import models
from config.cli import flag_fields, flag_names, write_recipe
from engine.state import RUN_SHAPING
from errors import UsageError
from programs import ROOT

PROGRAMS = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_finetune,
            "detection": main_detection, "segmentation": main_segmentation}
CONFIGS = {main_pretrain: "PretrainConfig", main_finetune: "FinetuneConfig", main_detection: "DetectConfig",
           main_segmentation: "SegmentConfig"}


@pytest.mark.parametrize("program", list(CONFIGS), ids=lambda m: m.__name__)
def test_every_flag_is_a_field_of_the_programs_config_and_back(program):
    config_type = next(v for k, v in vars(program).items() if k == CONFIGS[program])
    flags = flag_names(program.get_args_parser()) - {"config"}
    fields = set(flag_fields(config_type))
    assert flags == fields, (sorted(flags - fields), sorted(fields - flags))
    assert dataclasses.fields(config_type) and config_type.__dataclass_params__.frozen


def test_run_shaping_is_marked_on_the_fields_and_registered():
    assert {"input_size", "epochs", "warmup_epochs", "lr", "blr", "min_lr", "weight_decay", "mask_ratio",
            "mask_regular", "vis_mask_ratio", "norm_pix_loss", "finetune", "load_from", "layer_decay", "drop_path",
            "linprobe", "nb_classes"} <= set(RUN_SHAPING)
    assert not {"output_dir", "seed", "num_workers", "print_freq", "batch_size"} & set(RUN_SHAPING)


def test_resolving_creates_no_folder_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    env = dict(os.environ)
    out = tmp_path / "not" / "yet"
    config = main_pretrain.parse_args(["--model", "mae_swin_pico_128", "--output_dir", str(out), "--local_rank", "3",
                                       "--device", "cpu"])
    assert not out.exists() and dict(os.environ) == env
    assert config.log_dir == str(out / "tensorboard") and config.local_rank == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from segmentation.toy import make_toy_ade
    from tiny_data import make_labelled
    from tools.make_tiny_coco import make_tiny_coco
    root = tmp_path_factory.mktemp("data")
    return {"finetune": make_labelled(root / "cls", per_class=2, size=32), "linprobe": root / "cls",
            "detection": make_tiny_coco(root / "coco"), "segmentation": make_toy_ade(root / "ade"), "pretrain": None}


RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_resolves_with_its_program(recipe, data, tmp_path):
    kind = recipe.split("_")[0].removesuffix(".yaml")
    program = PROGRAMS[kind]
    argv = ["--config", str(ROOT / "recipes" / recipe), "--output_dir", str(tmp_path / "o"), "--device", "cpu"]
    if data[kind] is not None:
        argv += ["--data_path", str(data[kind])]
    if kind in ("finetune", "linprobe"):
        argv += ["--nb_classes", "3"]
    config = program.parse_args(argv)
    recipe_values = __import__("yaml").safe_load((ROOT / "recipes" / recipe).read_text())
    for key, value in recipe_values.items():
        got = getattr(config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value or key == "aa", (recipe, key, got, value)
    assert recipe != "linprobe.yaml" or config.linprobe


def test_flags_override_a_recipe_and_the_written_config_runs_the_same_run(tmp_path):
    recipe = ROOT / "recipes" / "pretrain_ummae_swin_tiny_256.yaml"
    config = main_pretrain.parse_args(["--config", str(recipe), "--model", "mae_swin_pico_128", "--input_size", "128",
                                       "--token_size", "8", "--epochs", "3", "--output_dir", str(tmp_path / "o"),
                                       "--device", "cpu"])
    assert (config.model, config.epochs, config.batch_size, config.vis_mask_ratio) == ("mae_swin_pico_128", 3, 128, 0.25)
    (tmp_path / "o").mkdir()
    written = write_recipe(config)
    again = main_pretrain.parse_args(["--config", str(written)])
    assert {k: v for k, v in vars(again).items() if k != "launch_command"} == \
        {k: v for k, v in vars(config).items() if k != "launch_command"}


def test_a_recipe_with_a_key_that_is_no_flag_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mae_swin_pico_128\nbatchsize: 4\n")
    with pytest.raises(UsageError, match="batchsize is not a flag of this program; valid: "):
        main_pretrain.parse_args(["--config", str(bad), "--output_dir", str(tmp_path / "o")])


def test_finetune_takes_the_classifier_from_the_checkpoint(data, tmp_path):
    """A pretraining checkpoint names its model; --model then defaults to the classifier it finetunes into."""
    ckpt = tmp_path / "pre.pth"
    torch.save({"model": models.create_model("mae_pvt_pico_128").state_dict(), "model_name": "mae_pvt_pico_128"}, ckpt)
    config = main_finetune.parse_args(["--finetune", str(ckpt), "--data_path", str(data["finetune"]), "--device", "cpu",
                                       "--output_dir", str(tmp_path / "o")])
    assert config.model == "pvt_pico_128" == models.classifier_for("mae_pvt_pico_128")
    assert main_finetune.parse_args(["--data_path", str(data["finetune"]), "--output_dir",
                                     str(tmp_path / "o")]).model == main_finetune.DEFAULT_MODEL
