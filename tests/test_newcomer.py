"""What a new user meets first: evaluation that evaluates the trained weights, advice that fits the
program, every problem of a command line in one message (tiny data, the pico models)."""
import json
from pathlib import Path

import pytest
import torch

import main_detection
import main_segmentation
from errors import CheckpointError, UsageError
from segmentation.toy import make_toy_ade
from tools.make_tiny_coco import make_tiny_coco


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("coco"), n_train=4, n_val=2, size=64)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_ade(tmp_path_factory.mktemp("toy_seg"), n_train=4, n_val=2)


@pytest.fixture(scope="module")
def pretraining_checkpoint(tmp_path_factory) -> Path:
    """A file shaped like main_pretrain.py's checkpoints: encoder weights and the run's flags."""
    path = tmp_path_factory.mktemp("pre") / "checkpoint-0.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "epoch": 0, "model_name": "mae_swin_pico_128",
                "config": {"model": "mae_swin_pico_128", "mask_ratio": 0.75}}, path)
    return path


def det_args(coco, out, *extra) -> list[str]:
    return ["--data_path", str(coco), "--output_dir", str(out), "--log_dir", "", "--device", "cpu",
            "--num_workers", "0", "--print_freq", "100", *map(str, extra)]


# the run's architecture differs from every default: --eval must read it from the checkpoint
DET_TRAIN = ["--model", "swin_pico_128", "--input_size", "64", "--test_size", "64", "64", "--batch_size", "2",
             "--adapter_dim", "32", "--fpn_dim", "32", "--neck_norm", "gn", "--warmup_iters", "1", "--epochs", "1"]


@pytest.fixture(scope="module")
def detection_run(coco, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det")
    assert main_detection.main(main_detection.parse_args(det_args(coco, out, *DET_TRAIN))) == 0
    return out


def test_a_smoke_run_leaves_a_best_checkpoint_that_eval_scores_without_repeating_its_flags(
        coco, detection_run, tmp_path, capsys):
    """One epoch of an untrained detector scores AP ~0: checkpoint-best.pth is still written, and the
    documented `--eval --resume OUTPUT_DIR/checkpoint-best.pth` rebuilds the detector (adapter, FPN,
    neck, test size) from the checkpoint: no changed-flags warning, no training log copied."""
    best = detection_run / "checkpoint-best.pth"
    assert best.is_file()
    capsys.readouterr()
    ev = tmp_path / "ev"
    assert main_detection.main(main_detection.parse_args(det_args(coco, ev, "--eval", "--resume", best))) == 0
    out = capsys.readouterr().out
    assert "changed flags" not in out and "restored the line" not in out and "resumed" not in out
    assert "evaluating " + str(best) in out
    assert not (ev / "log.txt").exists() and not (ev / "tensorboard").exists()
    result = json.loads((ev / "eval.json").read_text())
    trained = json.loads((detection_run / "eval_epoch0.json").read_text())
    assert result["weights"] == str(best) and result["bbox"] == trained["bbox"]


def test_eval_refuses_to_score_untrained_weights_unless_asked(coco, detection_run, pretraining_checkpoint, tmp_path):
    with pytest.raises(UsageError, match=r"^--eval needs the weights to evaluate: --resume OUTPUT_DIR/checkpoint-best"):
        main_detection.parse_args(det_args(coco, tmp_path, "--eval"))
    with pytest.raises(UsageError, match=r"pretraining checkpoint of mae_swin_pico_128: it holds no detection heads, "
                                         r"so --eval would score untrained heads"):
        main_detection.parse_args(det_args(coco, tmp_path, "--eval", "--model", "swin_pico_128", "--finetune",
                                           pretraining_checkpoint))
    config = main_detection.parse_args(det_args(coco, tmp_path, "--eval", "--random_weights"))
    assert config.random_weights and not config.auto_resume


def test_resume_advice_fits_detection(coco, detection_run, pretraining_checkpoint, tmp_path):
    """A pretraining checkpoint given to --resume is told to be --finetune (detection has no
    --model mae_...); flags contradicting a trained checkpoint's architecture are named."""
    with pytest.raises(UsageError) as e:
        main_detection.parse_args(det_args(coco, tmp_path, "--model", "swin_pico_128", "--resume",
                                           pretraining_checkpoint))
    assert f"start a training run from its weights with --finetune {pretraining_checkpoint}" in str(e.value)
    assert "--model mae_" not in str(e.value)
    with pytest.raises(UsageError, match=r"was trained with --detector gfl --fpn_dim 32, but the command line gives "
                                         r"--detector mask_rcnn --fpn_dim 64: drop these flags"):
        main_detection.parse_args(det_args(coco, tmp_path, "--eval", "--resume", detection_run / "checkpoint-best.pth",
                                           "--detector", "mask_rcnn", "--fpn_dim", "64"))


def test_unknown_backbones_are_named_from_what_the_program_accepts(coco, tmp_path):
    with pytest.raises(UsageError) as e:
        main_detection.parse_args(det_args(coco, tmp_path, "--model", "swin_pico_12"))
    text = str(e.value)
    assert "did you mean swin_pico_128" in text and "hiera" not in text and "mixmim" not in text
    with pytest.raises(UsageError, match=r"a pretraining model: its checkpoint's backbone is --model swin_pico_128"):
        main_detection.parse_args(det_args(coco, tmp_path, "--model", "mae_swin_pico_128"))
    with pytest.raises(UsageError, match=r"--model hiera_pico_128 is a classifier without a feature pyramid"):
        main_segmentation.parse_args(["--data_path", str(tmp_path), "--model", "hiera_pico_128"])


def test_detection_lists_every_problem_and_refuses_a_warmup_longer_than_the_run(coco, tmp_path):
    with pytest.raises(UsageError) as e:
        main_detection.parse_args(det_args(tmp_path / "nowhere", tmp_path, "--model", "nope", "--epochs", "0",
                                           "--warmup_iters", "-1"))
    problems = e.value.problems
    assert len(problems) == 4 and str(e.value).startswith("4 problems:\n  - unknown --model 'nope'")
    assert any("not a folder" in p for p in problems) and any("--epochs" in p for p in problems)
    config = main_detection.parse_args(det_args(coco, tmp_path, *DET_TRAIN[:-4], "--epochs", "2"))  # warmup 2000
    with pytest.raises(UsageError, match=r"--warmup_iters 2000 is not shorter than the run's 4 optimizer steps"):
        main_detection.main(config)


SEG = ["--device", "cpu", "--log_dir", "", "--num_workers", "0", "--print_freq", "100", "--model", "swin_pico_128",
       "--input_size", "64", "--img_scale", "96", "64", "--batch_size", "2"]
SEG_RUN = ["--channels", "32", "--aux_channels", "16", "--nb_classes", "4", "--iters", "2", "--eval_interval", "2",
           "--warmup_iters", "1", "--test_stride", "32"]


def test_segmentation_eval_reads_the_heads_from_the_checkpoint(toy, tmp_path, capsys):
    """--eval without --channels / --aux_channels / --nb_classes / --test_stride: the checkpoint's are
    used; a pretraining checkpoint's missing heads are refused rather than scored."""
    run = tmp_path / "run"
    assert main_segmentation.main(main_segmentation.parse_args(
        SEG + SEG_RUN + ["--data_path", str(toy), "--output_dir", str(run)])) == 0
    trained = json.loads((run / "eval_iter_2.json").read_text())["slide"]
    out = capsys.readouterr().out  # the training run speaks its unit, iterations
    assert "iteration 2/2 done" in out and "iterations 0-2 of 2 (2 in this run)" in out and "epoch" not in out
    ev = tmp_path / "ev"
    config = main_segmentation.parse_args(["--data_path", str(toy), "--output_dir", str(ev), "--device", "cpu",
                                           "--num_workers", "0", "--eval", "--resume", str(run / "checkpoint-best.pth")])
    assert (config.channels, config.aux_channels, config.nb_classes, config.test_stride) == (32, 16, 4, 32)
    capsys.readouterr()
    assert main_segmentation.main(config) == 0
    out = capsys.readouterr().out
    assert "changed flags" not in out and "--epochs" not in out and not (ev / "log.txt").exists()
    assert json.loads((ev / "eval.json").read_text())["slide"]["mIoU"] == trained["mIoU"]


def test_segmentation_eval_of_a_pretraining_checkpoint_is_refused(toy, pretraining_checkpoint, tmp_path):
    with pytest.raises(UsageError, match=r"holds no segmentation heads, so --eval would score untrained heads"):
        main_segmentation.parse_args(SEG + SEG_RUN + ["--data_path", str(toy), "--output_dir", str(tmp_path),
                                                      "--eval", "--finetune", str(pretraining_checkpoint)])


def test_segmentation_checks_labels_against_nb_classes_and_lists_every_problem(toy, tmp_path, capsys):
    """The newcomer's toy run: the recipe's --test_stride and --warmup_iters named at once with the
    label range, and the toy set's 4 classes under the default 150 warned about."""
    with pytest.raises(UsageError) as e:
        main_segmentation.parse_args(SEG + ["--data_path", str(toy), "--output_dir", str(tmp_path), "--iters", "8",
                                            "--nb_classes", "3"])
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("--nb_classes 3, but the label maps hold class 3") and "use --nb_classes 4" in problems[0]
    assert any(p.startswith("--test_stride 341 exceeds the window --input_size 64") for p in problems)
    assert any(p.startswith("--warmup_iters 1500 must be in [0, --iters 8)") for p in problems)
    main_segmentation.parse_args(SEG + SEG_RUN[:4] + SEG_RUN[6:] + ["--data_path", str(toy), "--output_dir", str(tmp_path)])
    assert "pass --nb_classes 4" in capsys.readouterr().err


def test_the_folder_above_the_ade20k_layout_names_every_missing_folder_and_the_subfolder(tmp_path):
    data = make_toy_ade(tmp_path / "above" / "ADEChallengeData2016", n_train=1, n_val=1)
    with pytest.raises(UsageError) as e:
        main_segmentation.parse_args(SEG + SEG_RUN + ["--data_path", str(data.parent), "--output_dir", str(tmp_path / "o")])
    assert str(e.value) == (f"--data_path {data.parent} is not in ADE20K layout: missing images/training/, "
                            f"annotations/training/, images/validation/ and annotations/validation/ (expected "
                            f"images/{{training,validation}}/*.jpg and annotations/{{training,validation}}/*.png); "
                            f"ADEChallengeData2016/ has it: use --data_path {data}")


def test_colour_label_maps_are_refused_at_start_up_in_one_line(tmp_path):
    """RGB label maps everywhere: one line at start-up naming the cause, not a warning per pair and then
    a data error after the loaders started."""
    import numpy as np
    from PIL import Image
    data = make_toy_ade(tmp_path / "rgb", n_train=2, n_val=2)
    for p in sorted(data.glob("annotations/*/*.png")):
        a = np.array(Image.open(p))
        Image.fromarray(np.stack([a * 40] * 3, -1).astype(np.uint8)).save(p)
    with pytest.raises(UsageError) as e:
        main_segmentation.parse_args(SEG + SEG_RUN + ["--data_path", str(data), "--output_dir", str(tmp_path / "o")])
    assert str(e.value).startswith("the label maps are not single-channel (") and "shape (64, 96, 3)" in str(e.value)
    assert "convert colour maps to class indices" in str(e.value)


def test_a_coco_file_without_categories_is_named(coco, tmp_path):
    import shutil
    from errors import DataError
    from detection.coco import read_coco
    data = tmp_path / "coco"
    shutil.copytree(coco, data)
    path = data / "annotations" / "instances_train2017.json"
    content = json.loads(path.read_text())
    del content["categories"]
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"no 'categories' list, so the category_id of all \d+ annotations names no "
                                         r"class: add 'categories'"):
        read_coco(path, data / "train2017", train=True)


def test_a_trained_checkpoint_that_does_not_fit_names_the_architecture_flags(toy, tmp_path):
    from engine.evaluate import load_trained_weights
    path = tmp_path / "c.pth"
    torch.save({"model": {"weight": torch.zeros(3, 2)}}, path)
    with pytest.raises(CheckpointError, match=r"weight has shape \(3, 2\), the model \(2, 2\)\. The architecture "
                                              r"flags \(--channels\) come from the checkpoint"):
        load_trained_weights(torch.nn.Linear(2, 2, bias=False), str(path), ("channels",))


def test_reconstruct_blames_the_checkpoint_not_a_model_flag_never_given(tmp_path):
    """A finetuned classifier's checkpoint, no --model: the message names the file and the pretraining
    models of its backbone, not a --model the user never typed."""
    from tools import reconstruct
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": {}, "epoch": 0, "model_name": "swin_pico_128", "config": {"model": "swin_pico_128"}}, path)
    args = reconstruct.get_args_parser().parse_args(["--checkpoint", str(path), "--images", str(tmp_path)])
    with pytest.raises(UsageError) as e:
        reconstruct.build(args)
    text = str(e.value)
    assert text.startswith(f"{path} holds swin_pico_128, not a pretraining model") and "--model" not in text
    assert "a checkpoint of mae_swin_pico_128" in text
    args.model = "mae_swin_pico_12"
    with pytest.raises(UsageError, match=r"unknown --model 'mae_swin_pico_12'; did you mean mae_swin_pico_128"):
        reconstruct.build(args)


@pytest.mark.parametrize("kind", ["gfl", "mask_rcnn", "segmentation"])
def test_export_backbone_takes_the_classifier_out_of_a_dense_checkpoint(kind, tmp_path):
    """A detection or segmentation checkpoint exports the classifier it was trained on (its model name
    read from the file), weight for weight."""
    import models
    from models.dense import DenseBackbone
    from tools.export_backbone import export_backbone, load_backbone
    backbone = DenseBackbone(models.create_model("swin_pico_128", num_classes=0))
    if kind == "segmentation":
        from segmentation.heads import SegmentationModel
        model = SegmentationModel(backbone, 4, adapter_dim=16, channels=16, aux_channels=8)
    else:
        from detection.detector import build_detector
        model = build_detector(kind, backbone, 3, adapter_dim=16, fpn_dim=16)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": 0, "model_name": "swin_pico_128"}, path)
    out = export_backbone(str(path), None, str(tmp_path / "bb"))
    exported = load_backbone(out).state_dict()
    trained = backbone.body.state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in exported if not k.startswith("head."))
    assert json.loads((out / "backbone.json").read_text())["source_model"].startswith(
        "a segmentation checkpoint" if kind == "segmentation" else f"a {'GFL' if kind == 'gfl' else 'Mask R-CNN'} detection")


def test_export_backbone_names_the_classifier_of_a_pretraining_model(tmp_path):
    from tools.export_backbone import export_backbone
    with pytest.raises(UsageError, match=r"^--model mae_swin_pico_128 is a pretraining model; its classifier is "
                                         r"swin_pico_128: use --model swin_pico_128"):
        export_backbone(str(tmp_path / "c.pth"), "mae_swin_pico_128", str(tmp_path / "bb"))
    with pytest.raises(UsageError, match=r"^unknown --model 'swin_pico_12'; did you mean swin_pico_128"):
        export_backbone(str(tmp_path / "c.pth"), "swin_pico_12", str(tmp_path / "bb"))


def test_data_wait_warning_needs_real_waiting_and_names_only_the_programs_own_flags():
    from config.sections import data_advice
    from engine.data_wait import warning
    tiny = {"data_wait_share": 0.5, "data_wait_s": 0.05}  # half of a 0.1-second epoch: workers starting
    assert warning(tiny, "epoch 0", 1) is None
    slow = {"data_wait_share": 0.5, "data_wait_s": 30.0}
    from config.segmentation import SegmentConfig
    from config.finetune import FinetuneConfig
    seg_advice = data_advice(object.__new__(SegmentConfig))
    assert seg_advice == "raise --num_workers"
    line = warning(slow, "iterations 0-500", 1, seg_advice)
    assert line.startswith("warning: iterations 0-500 waited 50%") and "--decode" not in line and "shards" not in line
    ft_advice = data_advice(object.__new__(FinetuneConfig))
    assert "--decode" not in ft_advice and "tools/make_shards.py" in ft_advice


def test_parameter_counts_below_a_million_are_shown_exactly():
    from main_finetune import count_text
    assert count_text(1_290) == "1,290" and count_text(28_288_354) == "28.29M"


PROGRAMS = ["main_pretrain.py", "main_detection.py", "main_segmentation.py", "main_finetune.py", "main_linprobe.py",
            "tools/reconstruct.py", "tools/export_backbone.py", "submitit_pretrain.py", "submitit_detection.py", "submitit_segmentation.py",
            "submitit_finetune.py"]
_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules)
print("HEAVY", ",".join(heavy) or "none", "CODE", code, file=sys.stderr)
"""


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_and_a_wrong_flag_answer_before_torch_loads(program):
    """--help and a mistyped flag are answered by argparse before torch, torchvision or timm are
    imported; the error comes first, with the close flag name and a pointer to --help, no usage wall."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    required = {"tools/reconstruct.py": ["--checkpoint", "c.pth", "--images", "x"],
                "tools/export_backbone.py": ["--checkpoint", "c.pth", "--output", "x"]}.get(program, [])
    for args, code in ((["--help"], 0), ([*required, "--batch_sise", "3"], 2)):
        done = subprocess.run([sys.executable, "-c", _PROBE, program, *args], cwd=root, capture_output=True, text=True,
                              timeout=120)
        assert f"HEAVY none CODE {code}" in done.stderr, (program, args, done.stderr[-2000:])
        if code:
            name = Path(program).name
            lines = done.stderr.splitlines()
            assert lines[0].startswith(f"{name}: error: unrecognized arguments: --batch_sise 3"), lines
            assert "usage:" not in done.stderr and lines[0].endswith(f"; python {name} --help lists every flag")
            if not program.startswith("tools/"):
                assert "(did you mean --batch_size?)" in lines[0]
        else:
            assert "(default: " in done.stdout


def test_pretraining_names_the_pretraining_models_of_a_classifier(tmp_path):
    """A classifier name given to main_pretrain.py: called a classifier, its pretraining models named
    (from the registry); a typo gets the close pretraining names."""
    import main_pretrain
    import models
    argv = ["--output_dir", str(tmp_path), "--device", "cpu", "--model"]
    with pytest.raises(UsageError) as e:
        main_pretrain.parse_args(argv + ["swin_pico_128"])
    assert str(e.value) == (f"--model swin_pico_128 is a classifier (main_finetune.py trains it), not a pretraining "
                            f"model; its pretraining models: --model {' or '.join(models.pretraining_models_for('swin_pico_128'))}")
    assert {"mae_swin_pico_128", "simmim_swin_pico_128"} <= set(models.pretraining_models_for("swin_pico_128"))
    with pytest.raises(UsageError, match=r"^unknown --model 'mae_swin_pico_12'; did you mean mae_swin_pico_128"):
        main_pretrain.parse_args(argv + ["mae_swin_pico_12"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without CUDA")
def test_decode_gpu_without_cuda_names_the_fix_not_a_device_never_typed(tmp_path):
    import main_pretrain
    argv = ["--output_dir", str(tmp_path), "--model", "mae_swin_pico_128", "--decode", "gpu"]
    for extra in ([], ["--device", "cuda"]):  # one message, whether or not --device cuda was given
        with pytest.raises(UsageError) as e:
            main_pretrain.parse_args(argv + extra)
        assert str(e.value) == ("--decode gpu decodes on a CUDA device and none is available here: use --decode fast "
                                "or pil, or run on a CUDA machine")
    with pytest.raises(UsageError, match=r"^--decode gpu decodes on a CUDA device, but the command line gives "
                                         r"--device cpu: use --decode fast or pil$"):
        main_pretrain.parse_args(argv + ["--device", "cpu"])
    # a SLURM submission from a login node without CUDA: the compute node's device decodes
    from launch import slurm
    args = slurm.prepare(main_pretrain, argv + ["--job_dir", str(tmp_path / "jobs"), "--nodes", "1", "--ngpus", "1"])
    assert args.decode == "gpu" and args.device is None


def test_a_local_submission_says_it_runs_in_the_background_and_which_log_to_follow():
    from launch.slurm import submitted_line
    line = submitted_line("123", "/jobs/%j", local=True)
    assert "runs in the background on this machine" in line and "tail -f /jobs/123/123_0_log.out" in line
    assert "squeue -j 123" in submitted_line("123", "/jobs/%j", local=False)


def test_finetune_lists_every_problem_and_refuses_a_warmup_longer_than_the_run(tmp_path):
    import main_finetune
    (tmp_path / "train").mkdir()
    with pytest.raises(UsageError) as e:
        main_finetune.parse_args(["--model", "swin_pico_128", "--data_path", str(tmp_path), "--device", "cpu",
                                  "--output_dir", str(tmp_path / "o"), "--epochs", "2", "--remode", "bogus",
                                  "--min_crop_scale", "0"])
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert "--warmup_epochs 5 is longer than --epochs 2" in problems[1] and "--remode 'bogus'" in problems[0]


USER_DOCS = ["README.md", "PRETRAIN.md", "FINETUNE.md", "DETECTION.md", "SEGMENTATION.md"]
# words about how the project was made, which mean nothing to a user of it
HISTORY = [r"\bissue #?\d+", r"\bsession \d+", r"\bspec §", r"\bthis change\b", r"\bthe previous code\b",
           r"\bthis machine\b", r"\bthis project's machine\b", r"\bnot run here\b", r"\bwork item"]


@pytest.mark.parametrize("doc", USER_DOCS)
def test_user_docs_speak_of_the_project_as_it_is(doc):
    """No development history in a user document, and every module or tool it runs exists."""
    import re
    root = Path(__file__).resolve().parents[1]
    text = (root / doc).read_text()
    found = [m.group(0) for pattern in HISTORY for m in re.finditer(pattern, text, re.IGNORECASE)]
    assert found == [], (doc, found)
    modules = set(re.findall(r"python -m ((?:tools|segmentation|detection|engine|models)(?:\.\w+)+)", text))
    modules |= {m for m in re.findall(r"from ((?:tools|engine|models|util)\.\w+) import", text)}
    missing = [m for m in sorted(modules) if not (root / (m.replace(".", "/") + ".py")).is_file()]
    files = set(re.findall(r"\b((?:tools|scripts)/\w+\.(?:py|sh))\b", text))
    missing += [f for f in sorted(files) if not (root / f).is_file()]
    assert missing == [], (doc, missing)
