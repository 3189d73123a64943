"""Linear probing (MAE's recipe): frozen encoder, BatchNorm without affine + linear head, LARS.

Same program as main_finetune.py with the recipe recipes/linprobe.yaml as its defaults: --linprobe,
batch 512, 90 epochs, blr 0.1, weight decay 0, warmup 10, no mixup / RandAugment / random erasing /
label smoothing. ViT probes classify the cls token after the final norm (MAE's ``--global_pool``
off); ``--global_pool`` selects the mean of the patch tokens instead. The optimizer is
engine.lars.LARS (momentum 0.9, trust coefficient 0.001). All main_finetune.py flags apply.
"""
from pathlib import Path

from config.cli import answer_usage_first_with, flag_names, load_recipe, recipe_defaults, run_main

RECIPE = Path(__file__).resolve().parent / "recipes" / "linprobe.yaml"

if __name__ == "__main__":  # main_finetune.py answers --help and flag errors (with this recipe) before torch loads
    answer_usage_first_with(recipe_defaults(str(RECIPE)))

from main_finetune import get_args_parser, main, parse_args  # noqa: E402

LINPROBE_DEFAULTS = load_recipe(str(RECIPE), flag_names(get_args_parser()))

if __name__ == "__main__":
    run_main(lambda: main(parse_args(defaults=LINPROBE_DEFAULTS)))
