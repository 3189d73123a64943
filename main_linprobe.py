"""Linear probing (MAE's recipe): frozen encoder, BatchNorm without affine + linear head, LARS.

Same program as main_finetune.py with ``--linprobe`` and these defaults: batch 512, 90 epochs,
blr 0.1, weight decay 0, warmup 10, no mixup / RandAugment / random erasing / label smoothing.
ViT probes classify the cls token after the final norm (MAE's ``--global_pool`` off); ``--global_pool``
selects the mean of the patch tokens instead. The optimizer is engine.lars.LARS (momentum 0.9, trust
coefficient 0.001). All main_finetune.py flags apply.
"""
from main_finetune import main, parse_args
from config.cli import run_main

LINPROBE_DEFAULTS = dict(linprobe=True, batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, warmup_epochs=10,
                         min_lr=0.0, global_pool=False, aa=None, reprob=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0)

if __name__ == "__main__":
    run_main(lambda: main(parse_args(defaults=LINPROBE_DEFAULTS)))
