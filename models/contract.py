"""The contract between the programs and the models: what a model is, asked of the model.

Programs (main_pretrain.py, main_finetune.py, tools/benchmark.py, util/visualize.py,
engine/optim.py) read a model's ``contract`` and nothing else; none of them matches on a
model's name. A pretraining model derives from ``PretrainModel`` and a classifier from
``Classifier``; each declares the class attributes below that differ from the defaults, and
the ``contract`` property turns them (and the built instance's geometry) into one frozen,
typed description. Adding a method means filling in these attributes, nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, NamedTuple, Optional

from torch import Tensor

MaskKind = Literal["uniform", "random", "any"]


class PretrainOutput(NamedTuple):
    """What every pretraining model's ``forward(imgs, mask, sm_mask=None)`` returns.

    imgs: (N, C, H, W), C = the contract's in_chans; mask: (N, L) bool, True = removed, L = token_size**2 mask units in raster
    order; sm_mask: (N, L) bool, the secondary mask (kept units hidden behind a learnt token), or
    None for none. Masks come only from the caller: a model draws none itself."""
    loss: Tensor        # scalar: the method's reconstruction loss
    pred: Tensor        # (N, L, stride * stride * C): per-unit predictions, raster order (in training
                        # mode some models predict only the removed units; the others are 0)
    mask: Tensor        # (N, L): the mask the model used (MixMAE pairs its samples' masks)


@dataclass(frozen=True)
class PretrainContract:
    """What a pretraining model is, for the programs that train, benchmark and draw it."""
    family: str                      # method family: "um-mae", "mae", "simmim", "greenmim", "mixmae", "hiera-mae"
    mask_kind: MaskKind              # "uniform": one kept unit per 2x2 group only; "random": random only; "any"
    default_mask_ratio: float        # the method's ratio when --mask_ratio is not given
    stride: int                      # mask-unit side, pixels
    token_size: int                  # mask-unit grid side at the size the model was built for
    input_size: int                  # that size, pixels (token_size * stride)
    secondary_mask: bool             # takes a secondary (visible-unit) mask
    images_per_sample: int           # source images one sample of the batch carries
    options: tuple[str, ...]         # factory keywords, beyond img_size / norm_pix_loss / vis_mask_ratio, taken from flags
    no_weight_decay: frozenset[str]  # parameters pretraining does not decay (besides the 1-D rule)
    raw_pixel_recipe: bool           # the method's recipe trains on raw pixels (no norm-pix targets)
    mask_rounding: str               # how masks round the removed count (models.masking.num_removed)
    mask_note: str                   # what the figure's hidden units are, in the method's words
    norm_pix_unit: int               # side of the patches norm-pix targets are normalised over
    norm_pix_loss: bool              # built with norm-pix targets
    vis_mask_ratio: float            # built with this secondary-masking ratio (0: off)
    classifier: Optional[str]        # the registered classifier its checkpoint finetunes into
    pretrain_only: tuple[str, ...] = ()  # parameter-name prefixes a classifier drops when it loads the checkpoint
    compile_note: str = ""           # why --compile does not suit the model (empty: it does)
    in_chans: int = 3                # image channels the model takes (its pixel targets have as many)

    def grid(self, input_size: int) -> int:
        """The mask-unit grid side for ``input_size`` pixels."""
        return input_size // self.stride


@dataclass(frozen=True)
class ClassifierContract:
    """What a classifier is, for finetuning, layer decay and the dense-prediction programs."""
    family: str
    input_size: int                       # the size it was built for
    options: tuple[str, ...]              # factory keywords taken from finetuning flags (e.g. "global_pool")
    num_layers: int                       # layer-decay depth: ids run 0 (stem) .. num_layers (head)
    layer_id: Callable[[str], int] = field(compare=False)   # parameter name -> layer id
    no_weight_decay: frozenset[str] = frozenset()
    head: str = "head"                    # the final Linear (dotted path): what is reset, swapped or re-initialised
    prefix_tokens: int = 0                # tokens before the patches in pos_embed (resized without them)
    pyramid: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None  # (channels, strides) of forward_pyramid
    pyramid_divisor: int = 0                  # forward_pyramid pads its input to a multiple of this
    in_chans: int = 3                         # image channels it takes


def input_channels(model) -> int:
    """The channels a model's first convolution (its patch embedding) takes."""
    from torch import nn
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(first.in_channels) if first is not None else 3


class PretrainModel:
    """Mixin of every pretraining model: the typed defaults of its contract.

    Subclasses set ``stride`` and ``token_size`` on the instance and override the class
    attributes that differ; the registry sets ``classifier_name`` when it builds a variant.
    """
    family: ClassVar[str]                    # every model names its method family
    mask_kind: ClassVar[MaskKind] = "any"
    default_mask_ratio: ClassVar[float] = 0.75
    supports_secondary_mask: ClassVar[bool] = True
    images_per_sample: ClassVar[int] = 1
    build_options: ClassVar[tuple[str, ...]] = ()
    raw_pixel_recipe: ClassVar[bool] = False
    mask_rounding: ClassVar[str] = "keep"
    mask_note: ClassVar[str] = "grey = removed by the mask"
    norm_pix_unit: Optional[int] = None      # None: the mask unit (Hiera sets a part of it)
    # parameter-name prefixes only pretraining has: a classifier loading the checkpoint drops them
    pretrain_only: ClassVar[tuple[str, ...]] = ("decoder_", "mask_token", "vis_mask_token")
    compile_note: ClassVar[str] = ""
    classifier_name: Optional[str] = None
    stride: int
    token_size: int
    norm_pix_loss: bool
    vis_mask_ratio: float

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """The model's mapping of foreign checkpoint layouts onto its own keys (models.checkpoint_maps):
        what ``--load_from`` reads to continue another code base's pretraining."""
        from .checkpoint_maps import to_family
        return to_family(state_dict, self.family, type(self).__name__)

    def no_weight_decay_pretrain(self) -> set[str]:
        """Parameters pretraining does not decay; the reference decays every >1-D tensor (tokens too)."""
        return set()

    @property
    def contract(self) -> PretrainContract:
        return PretrainContract(
            family=self.family, mask_kind=self.mask_kind, default_mask_ratio=float(self.default_mask_ratio),
            stride=self.stride, token_size=self.token_size, input_size=self.token_size * self.stride,
            secondary_mask=bool(self.supports_secondary_mask), images_per_sample=int(self.images_per_sample),
            options=tuple(self.build_options), no_weight_decay=frozenset(self.no_weight_decay_pretrain()),
            raw_pixel_recipe=bool(self.raw_pixel_recipe), mask_rounding=self.mask_rounding,
            mask_note=self.mask_note, norm_pix_unit=int(self.norm_pix_unit or self.stride),
            norm_pix_loss=bool(self.norm_pix_loss), vis_mask_ratio=float(self.vis_mask_ratio),
            classifier=self.classifier_name, pretrain_only=tuple(self.pretrain_only),
            compile_note=self.compile_note, in_chans=input_channels(self))


def blocks_layer_id(name: str, num_layers: int) -> int:
    """The reference's layer ids for a flat ``blocks`` list (Swin, PVT, ViT):
    0 for the stem (``cls_token``, ``pos_embed``, ``patch_embed.*``), i + 1 for ``blocks.i.*``
    (a patch merging owned by block i shares its id), ``num_layers`` for the rest (norm, head)."""
    if name in ("cls_token", "pos_embed", "mask_token", "vis_mask_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


class Classifier:
    """Mixin of every classifier: the typed defaults of its contract. The layer-decay rule is
    ``lrd_num_layers()`` / ``lrd_layer_id(name)``; the default is the flat-``blocks`` rule."""
    family: ClassVar[str]                    # every classifier names its family
    build_options: ClassVar[tuple[str, ...]] = ()
    head_path: ClassVar[str] = "head"        # the final Linear (Hiera: "head.fc", behind its norm)
    prefix_tokens: ClassVar[int] = 0         # tokens before the patches in pos_embed (a ViT's cls token)

    def native_size(self) -> int:
        """The input size, pixels, the classifier was built for."""
        return int(self.img_size)

    def lrd_num_layers(self) -> int:
        return len(self.blocks) + 1

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """The model's mapping of foreign checkpoint layouts onto its own keys (models.checkpoint_maps)."""
        from .checkpoint_maps import to_family
        return to_family(state_dict, self.family, type(self).__name__)

    def lrd_layer_id(self, param_name: str) -> int:
        return blocks_layer_id(param_name, self.lrd_num_layers())

    @property
    def contract(self) -> ClassifierContract:
        pyramid, divisor = None, 0
        if hasattr(self, "pyramid_channels"):  # models.layers.StagePyramid, or the ViT's single-scale maps
            pyramid = (tuple(self.pyramid_channels), tuple(self.pyramid_strides))
            divisor = int(self.pyramid_divisor)
        nwd = self.no_weight_decay() if hasattr(self, "no_weight_decay") else ()
        return ClassifierContract(family=self.family, input_size=self.native_size(), options=tuple(self.build_options),
                                  num_layers=self.lrd_num_layers(), layer_id=self.lrd_layer_id,
                                  no_weight_decay=frozenset(nwd), head=self.head_path, prefix_tokens=int(self.prefix_tokens),
                                  pyramid=pyramid,
                                  pyramid_divisor=divisor, in_chans=input_channels(self))
