"""Named training recipes: every training choice of a paper's (or a released script's) setting at once, each
value with its source.

``crowdkernels train --recipe NAME`` starts from :func:`resolve` ``(NAME, dataset)``; explicit flags override
single values; ``--print-config`` prints the result. The README's recipe table is :func:`markdown_table`
(a test checks that the README holds exactly that table and that ``--print-config`` agrees with it). Without
``--recipe``, ``--model NAME`` starts from :data:`QUICK` (ours, for quick runs; not in the table).

Sources are cited as: a paper section ("HMoDE sec. IV-B2", "L2SM sec. 4.2", "CSRNet sec. 3"), a released
file ("released train.py": github ZPDu/Redesigning-Multi-Scale-Neural-Network-for-Crowd-Counting; "CSRNet
train.py": github leeyeehoo/CSRNet-pytorch; "SASNet prepare_dataset.py", whose maps the HMoDE README names
as its ground truth), or "ours" where neither the paper nor a released file says, with the reason.

Where a paper's text states a detail, its recipe follows the text; where the text is silent, it follows the
authors' released code (HMoDE; CSRNet's for the csrnet recipe), and says so; where the text and the released
code differ, the cell names both. Only the HMoDE authors' SHHA (ShanghaiTech A) setting was released: the
hmode-released cells on other datasets are those SHA settings applied.

Keys are :class:`crowdkernels.engine.config.TrainConfig` fields; ``target.*`` are the ground-truth settings
(``crowdkernels.density_maps`` arguments and the map scale factor), ``model_kwargs.*`` the model's
constructor arguments, ``criterion_kwargs.*`` its criterion's options.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Choice", "RECIPES", "RECIPE_NAMES", "QUICK", "resolve", "quick", "sources", "markdown_table", "TABLE_DATASETS"]

#: The datasets whose values the README table spells out (others take the "*" value).
TABLE_DATASETS = ("shanghaitech-a", "shanghaitech-b", "ucf-cc-50", "ucf-qnrf", "jhu", "nwpu")


@dataclass(frozen=True)
class Choice:
    """One setting of a recipe: ``value`` (or ``{dataset: value, "*": default}``) and its ``source``."""

    value: Any
    source: str

    def for_dataset(self, dataset: str | None):
        v = self.value
        if isinstance(v, dict) and "*" in v:
            return copy.deepcopy(v.get(dataset, v["*"]))
        return copy.deepcopy(v)


#: what eq. 2 leaves open in _REL (crowdkernels.losses.rel)
_REL_OURS = ("edge 'keep' (partial windows at the border) and reduction 'mean' over images: ours, eq. 2 and the "
             "text are silent (released func.py: AvgPool2d windows, i.e. 'drop', summed)")

_REL = {"region": 0.125, "num_hard": 9, "num_sublists": 3, "pairs": "adjacent", "edge": "keep", "reduction": "mean"}

#: weight_init "auto": He where no --pretrained encoder is given (see crowdkernels.models._common.init_normal_)
_HE = "without --pretrained, He: ours (N(0, 0.01) over a random encoder gives a constant map)"

_HMODE_RELEASED = {
    "model": Choice("hmode-official", "released HMoDE.py, train.py: HMoDE(True)"),
    "encoder": Choice("vgg16_bn", "released HMoDE.py: models.vgg16_bn(pretrained=True) (ImageNet)"),
    "input_norm": Choice("imagenet", "released setting.py: MEAN_STD, loading_data.py: Normalize"),
    "target.style": Choice("matlab", "HMoDE README: SASNet prepare_dataset.py maps (SHHA.py reads *_sigma4.h5)"),
    "target.sigma": Choice(4.0, "SASNet prepare_dataset.py (sigma 4)"),
    "target.kernel_size": Choice(15, "SASNet prepare_dataset.py (15 x 15)"),
    "target.scale": Choice(100.0, "released setting.py: LOG_PARA = 100"),
    "batch_size": Choice(1, "released setting.py: TRAIN_BATCH_SIZE = 1"),
    "crop": Choice(None, "released loading_data.py: batch 1 -> whole images (TRAIN_SIZE only crops batches > 1)"),
    "multiple": Choice(1, "released code: whole images, unpadded"),
    "flip": Choice(True, "released loading_data.py: RandomHorizontallyFlip"),
    "tiles": Choice(1, "released code: no tiling"),
    "patches": Choice(None, "released code: no patches"),
    "repeat": Choice(1, "released setting.py: AUGMENT = 1 (SHHA.py: each image AUGMENT times an epoch)"),
    "max_size": Choice(None, "released code: no resizing"),
    "optimizer": Choice("adam", "released train.py: optim.Adam"),
    "lr": Choice(2e-5, "released train.py: lr=2e-5"),
    "momentum": Choice(0.0, "released train.py: Adam (no momentum setting)"),
    "weight_decay": Choice(0.0, "released train.py: Adam default"),
    "epochs": Choice(200, "released setting.py: MAX_EPOCH = 200"),
    "lr_step": Choice(100, "released train.py: ExponentialLR(0.5) stepped once when epoch + 1 == 100"),
    "lr_gamma": Choice(0.5, "released train.py: gamma=0.5"),
    "criterion_kwargs.weights": Choice([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0], "released train.py: 2**(int(j / 3))"),
    "criterion_kwargs.reduction": Choice("sum", "released train.py: MSELoss(reduction='sum')"),
    "criterion_kwargs.resolution": Choice("input", "released HMoDE.py: outputs upsampled to the input size"),
    "criterion_kwargs.rel": Choice(False, "released train.py: relloss commented out"),
    "criterion_kwargs.rel_options": Choice({}, "released train.py: no REL"),
    "criterion_kwargs.attention_weight": Choice(1.0, "released train.py: + torch.sum(cross_entropy_loss)"),
    "criterion_kwargs.attention_reduction": Choice("sum", "released train.py: torch.sum(cross_entropy_loss)"),
    "criterion_kwargs.attention_log_eps": Choice(1e-10, "released train.py: log(amp + 1e-10)"),
    "criterion_kwargs.attention_threshold": Choice(1e-5, "released train.py: amp_gt = gt_map > 1e-5 * LOG_PARA"),
    "criterion_kwargs.importance_weight": Choice(1.0, "released train.py: + torch.sum(imp_loss)"),
    "criterion_kwargs.importance_per_image": Choice(False, "released HMoDE.py: cv_squared(wmaps.sum(0)), over the batch"),
    "criterion_kwargs.importance_unbiased": Choice(True, "released HMoDE.py: cv_squared: x.var() (torch: over N - 1)"),
    "criterion_kwargs.per_batch": Choice(True, "released train.py: loss / pred_maps[0].shape[0]"),
    "model_kwargs": Choice({}, "released HMoDE.py: K = 3, N = 2"),
    "weight_init": Choice("auto", "released HMoDE.py _weight_init_: N(0, 0.01), zero biases, on every conv outside the "
                                  "ImageNet VGG; " + _HE),
    "fold": Choice({"*": None, "ucf-cc-50": 1}, "not released (SHHA only); HMoDE sec. IV-A: UCF '5-fold cross "
                                                 "validation and calculate the average result': a run per --fold 1-5"),
    "val_start": Choice(100, "released train.py: validate if epoch + 1 >= 100"),
    "val_every": Choice(1, "released train.py: every epoch from then"),
    "val_from_train": Choice(None, "released loading_data.py: val_set = test_data (model selection on the test split)"),
    "fit_levels": Choice(False, "not an L2SM model"),
    "seed": Choice(640, "released setting.py: SEED = 640"),
}

_HMODE_PAPER = {
    **_HMODE_RELEASED,
    "model": Choice("hmode", "HMoDE sec. III, IV-B1 (the text's layers: see crowdkernels.models.hmode)"),
    "encoder": Choice("vgg16_bn", "HMoDE sec. IV-B1: VGG-16 BN pretrained on ImageNet"),
    "input_norm": Choice("imagenet", "silent; released setting.py: MEAN_STD"),
    "target.style": Choice("matlab", "sec. III-D cites [1] only; released: SASNet prepare_dataset.py maps"),
    "target.sigma": Choice(4.0, "silent; released: SASNet prepare_dataset.py (sigma 4)"),
    "target.kernel_size": Choice(15, "silent; released: SASNet prepare_dataset.py (15 x 15)"),
    "target.scale": Choice(100.0, "silent; released setting.py: LOG_PARA = 100"),
    "batch_size": Choice(1, "silent; released setting.py: TRAIN_BATCH_SIZE = 1. At batch 1 the released loader trains "
                            "on whole images (SHHA_collate crops only batches > 1); the text states random crops, and "
                            "the text wins, so: crops at batch 1"),
    "crop": Choice({"*": 256, "shanghaitech-a": 128}, "HMoDE sec. IV-B2: 256 x 256, 128 x 128 on SHA"),
    "multiple": Choice(16, "ours: pads to the model's multiple (a no-op on crops of 128 and 256)"),
    "flip": Choice(True, "HMoDE sec. IV-B2: horizontal flipping"),
    "tiles": Choice(1, "silent (sec. IV-B2 names crops and flips only); released code: no tiling"),
    "patches": Choice(None, "HMoDE sec. IV-B2: random crops"),
    "repeat": Choice(1, "silent; released setting.py: AUGMENT = 1 (one crop of each image an epoch)"),
    "max_size": Choice(None, "silent (sec. IV-B2 names crops and flips only); released code: no resizing"),
    "optimizer": Choice("adam", "HMoDE sec. IV-B2: Adam"),
    "lr": Choice(2e-5, "HMoDE sec. IV-B2: 2e-5"),
    "momentum": Choice(0.0, "HMoDE sec. IV-B2: Adam (no momentum setting)"),
    "weight_decay": Choice(0.0, "silent; released train.py: Adam default"),
    "epochs": Choice(200, "HMoDE sec. IV-B2: 200 epochs"),
    "lr_step": Choice(100, "HMoDE sec. IV-B2: halved after 100 epochs"),
    "lr_gamma": Choice(0.5, "HMoDE sec. IV-B2: halved"),
    "criterion_kwargs.weights": Choice([1.0] * 7, "HMoDE eq. 7: L = sum_k L_Ek + L_Att + L_Eim"),
    "criterion_kwargs.reduction": Choice("sum", "ours: the balance of the terms is unstated. Eq. 3 prints 1/Z, and "
                                                "beside eq. 2's REL on raw counts at unit weight that reading flattens "
                                                "the maps to 0 from random weights (measured, benchmarks/RESULTS.md); "
                                                "the released train.py's MSELoss(reduction='sum') weighs each pixel's "
                                                "error as eq. 2 weighs each count, and trains"),
    "criterion_kwargs.resolution": Choice("input", "HMoDE sec. III-D: optimized on the original resolution"),
    "criterion_kwargs.rel": Choice(True, "HMoDE eq. 4: L_E = L_Des + L_Rel on every output"),
    "criterion_kwargs.rel_weight": Choice(1.0, "HMoDE eq. 4 as printed: L_E = L_Des + L_Rel (no weight is stated, "
                                               "and the released train.py never calls REL)"),
    "criterion_kwargs.rel_normalize": Choice("window", "ours, measured: eq. 2 hinges on window counts, in the map's units "
                                                       "(x target.scale); as printed ('none') REL outweighs the summed "
                                                       "density loss and held-out MAE after 3600 steps was 53.8 against "
                                                       "40.0 with REL on the windows' mean densities (count / w^2) and 40.9 "
                                                       "without REL (SHB, benchmarks/RESULTS.md)"),
    "criterion_kwargs.rel_options": Choice(dict(_REL), "HMoDE sec. IV-B2 (w = 1/8, S = 9), eq. 2 (3 sub-lists, adjacent); "
                                                       + _REL_OURS),
    "criterion_kwargs.attention_weight": Choice(1.0, "HMoDE eq. 7"),
    "criterion_kwargs.attention_reduction": Choice("sum", "ours, as the density loss: released train.py "
                                                          "torch.sum(cross_entropy_loss) (eq. 5 prints 1/Z)"),
    "criterion_kwargs.attention_log_eps": Choice(None, "HMoDE eq. 5: log a_z, no epsilon; the clamp of each log at -100 "
                                                       "(as BCE) is ours (released: log(a + 1e-10)). Eq. 5 as printed "
                                                       "lacks the minus on its first term (a^g log a - (1 - a^g) log(1 - a)): "
                                                       "read as the cross entropy it names"),
    "criterion_kwargs.attention_threshold": Choice(1e-5, "HMoDE sec. III-D1: A^g 'the binarised result of the ground truth "
                                                         "density map using a threshold of 1e-5'"),
    "criterion_kwargs.importance_weight": Choice(1.0, "HMoDE eq. 7"),
    "criterion_kwargs.importance_per_image": Choice(True, "HMoDE sec. III-B2, eq. 6: per image (image-level)"),
    "criterion_kwargs.importance_unbiased": Choice(True, "eq. 6: sigma(W_i), over N or N - 1 unsaid; released "
                                                         "cv_squared: x.var() (over N - 1)"),
    "criterion_kwargs.per_batch": Choice(True, "ours, with the sums: released train.py: loss / batch size"),
    "model_kwargs": Choice({}, "HMoDE sec. IV-B1: K = 3, N = 2"),
    "weight_init": Choice("auto", "silent; released HMoDE.py: N(0, 0.01), zero biases, outside the ImageNet VGG; " + _HE),
    "fold": Choice({"*": None, "ucf-cc-50": 1}, "HMoDE sec. IV-A: UCF '5-fold cross validation and calculate the "
                                                 "average result': a run per --fold 1-5"),
    "val_start": Choice(1, "ours, departing from the released train.py, which validates on the test split from "
                           "epoch 100 of 200 (the paper is silent): selection starts at epoch 1, so a run cut short "
                           "(--time-limit, --max-steps) keeps its best epoch; on SHB the held-out MAE of one run "
                           "swings by 40 heads between epochs (benchmarks/RESULTS.md). hmode-released keeps 100"),
    "val_every": Choice(1, "silent; released train.py: every epoch"),
    "val_from_train": Choice(None, "silent (results on the test set); released: selection on the test split"),
    "seed": Choice(640, "silent; released setting.py: SEED = 640"),
}

_CSRNET_TARGET_STYLE = Choice("csrnet", "CSRNet make_dataset.ipynb (KD-tree, gaussian_filter, mode='constant')")
_CSRNET_SIGMA = Choice({"*": "adaptive", "shanghaitech-b": 15.0},
                       "CSRNet sec. 3 / make_dataset.ipynb: geometry-adaptive (k = 3, beta = 0.3); fixed 15 on SHB; "
                       "UCF-QNRF, JHU, NWPU: CSRNet has no setting for them, adaptive is ours")

_L2SM_PAPER = {
    "model": Choice("l2sm", "L2SM sec. 3"),
    "encoder": Choice("vgg16", "L2SM sec. 3.2: VGG16 backbone (ImageNet weights: ours, as its baselines)"),
    "input_norm": Choice("imagenet", "ours: the convention of the ImageNet VGG16"),
    "target.style": Choice("csrnet", "L2SM sec. 4.2: ground truth as CSRNet [15] (its make_dataset.ipynb)"),
    "target.sigma": Choice(_CSRNET_SIGMA.value, "L2SM sec. 4.2 -> CSRNet: adaptive (k = 3, beta = 0.3); fixed 15 on SHB; "
                                                "UCF-QNRF: CSRNet has no QNRF setting, adaptive is ours"),
    "target.kernel_size": Choice(15, "unused by style csrnet"),
    "target.scale": Choice(1.0, "silent; ours: maps sum to the count"),
    "batch_size": Choice(1, "L2SM sec. 4.2: whole images (on UCF-QNRF one image is cut into 4 tiles)"),
    "crop": Choice(None, "L2SM sec. 4.2: the whole image"),
    "multiple": Choice(32, "ours: the model pads to 8K = 32 itself"),
    "flip": Choice(False, "L2SM sec. 4.2: no augmentation stated"),
    "tiles": Choice({"*": 1, "ucf-qnrf": 2}, "L2SM sec. 4.2: UCF-QNRF images cut 2 x 2 into a batch of 4"),
    "patches": Choice(None, "L2SM sec. 4.2: whole images"),
    "repeat": Choice(1, "silent; no released code: ours, each image once an epoch"),
    "max_size": Choice({"*": None, "ucf-qnrf": [1920, 1080]}, "L2SM sec. 4.2: UCF-QNRF above 1080p down-sampled to 1920 x 1080"),
    "optimizer": Choice("adam", "L2SM sec. 4.2: Adam"),
    "lr": Choice(1e-4, "L2SM sec. 4.2: 1e-4"),
    "momentum": Choice(0.0, "L2SM sec. 4.2: Adam"),
    "weight_decay": Choice(0.0, "silent; ours: Adam without decay"),
    "epochs": Choice(200, "silent; ours: as HMoDE"),
    "lr_step": Choice(None, "L2SM sec. 4.2: 'initialized to 1e-4', no schedule given; ours: constant"),
    "lr_gamma": Choice(0.5, "unused (no step)"),
    "criterion_kwargs.lambda1": Choice(1.0, "L2SM sec. 4.2: lambda1 = 1"),
    "criterion_kwargs.lambda2": Choice(1.0, "silent (sec. 4.4, Fig. 5: 'rather stable for a wide range of weight of the "
                                            "center loss', no value chosen); ours: 1"),
    "criterion_kwargs.alpha": Choice(0.5, "silent (eq. 1 names the centre learning rate alpha, no value); no released "
                                          "code: ours"),
    "criterion_kwargs.center_init_max": Choice(1.0, "L2SM sec. 3.3: 'initialize the C centers with increasing random "
                                                    "values'; their range: ours, sorted U[0, 1)"),
    "criterion_kwargs.norm": Choice("squared", "L2SM sec. 3.4 writes ||.||_2 ('L2 loss'); ours: the squared error, the "
                                               "'L2 loss' of counting, and eq. 1 is the gradient of the squared centre "
                                               "loss ('l2': the norm as printed)"),
    "criterion_kwargs.sigma": Choice(_CSRNET_SIGMA.value, "L2SM sec. 3.3: each head keeps its own sigma (as the ground "
                                                          "truth; UCF-QNRF: adaptive, ours)"),
    "model_kwargs": Choice({"*": {"k": 4, "num_groups": 5, "num_centers": 3},
                            "ucf-cc-50": {"k": 4, "num_groups": 5, "num_centers": 5}},
                           "L2SM sec. 4.2: K = 4, G = 5, C = 3 (C = 5 on UCF_CC_50)"),
    "weight_init": Choice("auto", "silent; no released code: ours, N(0, 0.01) outside the ImageNet VGG (as CSRNet and "
                                  "HMoDE); " + _HE),
    "fold": Choice({"*": None, "ucf-cc-50": 1}, "L2SM sec. 4.1: UCF_CC_50 '5-fold cross-validation': a run per --fold 1-5"),
    "val_start": Choice(1, "silent; ours: every epoch"),
    "val_every": Choice(1, "silent; ours: every epoch"),
    "val_from_train": Choice(None, "silent; ours: the test split, as the other recipes (see --val-from-train)"),
    "fit_levels": Choice(True, "L2SM sec. 4.2: 'evenly divide all the images in a dataset into G groups of regions'; "
                               "the selection threshold is the lower bound of the top C groups ('If Di is larger than a "
                               "pre-defined value for selecting the top C groups of regions in training'), compared "
                               "with the predicted D_i in training as at inference (sec. 3.3: 'select the dense regions "
                               "based on the average initial density Di'); the groups are fitted on the ground truth's "
                               "region means: ours, the text does not say which density"),
    "seed": Choice(0, "ours: not stated"),
}

_CSRNET = {
    "model": Choice("csrnet", "CSRNet sec. 3"),
    "encoder": Choice("vgg16", "CSRNet sec. 3: the first 10 convs from a pretrained VGG-16"),
    "input_norm": Choice("imagenet", "CSRNet train.py: Normalize(ImageNet mean/std)"),
    "target.style": _CSRNET_TARGET_STYLE,
    "target.sigma": _CSRNET_SIGMA,
    "target.kernel_size": Choice(15, "unused by style csrnet"),
    "target.scale": Choice(1.0, "CSRNet: maps sum to the count"),
    "batch_size": Choice(1, "CSRNet train.py: batch_size = 1"),
    "crop": Choice(None, "CSRNet sec. 3: nine patches instead (below)"),
    "multiple": Choice(1, "ours: unpadded, as CSRNet train.py's batch 1 (the model pads to 8 itself)"),
    "flip": Choice(False, "CSRNet sec. 3: the mirrored patches (below) are the flips (CSRNet image.py: its crop/flip "
                          "block is disabled, 'if False:')"),
    "tiles": Choice(1, "CSRNet: no tiling"),
    "patches": Choice("csrnet9", "CSRNet sec. 3: 9 patches of 1/4 size (the 4 quarters + 5 random), mirrored (CSRNet "
                                 "image.py trains on whole images: its crop/flip block is 'if False:'; the text wins)"),
    "repeat": Choice(4, "silent; CSRNet dataset.py: root * 4, each training image 4 times an epoch (there whole "
                        "images; here its 18 patches each time)"),
    "max_size": Choice(None, "CSRNet: no resizing"),
    "optimizer": Choice("sgd", "CSRNet sec. 3: SGD"),
    "lr": Choice(1e-6, "CSRNet sec. 3: fixed learning rate 1e-6 (CSRNet train.py uses 1e-7)"),
    "momentum": Choice(0.95, "silent; CSRNet train.py: momentum 0.95"),
    "weight_decay": Choice(5e-4, "silent; CSRNet train.py: decay 5e-4"),
    "epochs": Choice(400, "silent; CSRNet train.py: 400 epochs, each of every image 4 times (repeat)"),
    "lr_step": Choice(None, "CSRNet sec. 3: fixed learning rate"),
    "lr_gamma": Choice(0.5, "unused (no step)"),
    "criterion_kwargs.reduction": Choice("sum", "CSRNet sec. 3: L = 1/(2N) sum_i ||Z_i - Z_i^GT||^2"),
    "criterion_kwargs.density_weight": Choice(0.5, "CSRNet sec. 3: the 1/2 (CSRNet train.py: MSELoss(size_average="
                                                   "False), no 1/2; the text wins)"),
    "criterion_kwargs.downsample": Choice("cubic", "silent; CSRNet image.py: cv2.resize(target, (w/8, h/8), "
                                                   "interpolation=cv2.INTER_CUBIC) * 64 (ours without it: 'sum' over 8 x 8 cells)"),
    "criterion_kwargs.per_batch": Choice(True, "CSRNet sec. 3: the 1/N"),
    "criterion_kwargs.rel": Choice(False, "CSRNet; --rel adds REL as in HMoDE Table X"),
    "criterion_kwargs.rel_options": Choice(dict(_REL), "HMoDE sec. IV-B2, eq. 2 (used with --rel); " + _REL_OURS),
    "criterion_kwargs.rel_weight": Choice(1.0, "ours (used with --rel): HMoDE sec. IV-D / Table X do not say how REL "
                                               "was added to CSRNet; as hmode-paper, eq. 4's unit weight"),
    "criterion_kwargs.rel_normalize": Choice("window", "ours (used with --rel): as hmode-paper, REL on the windows' "
                                                       "mean densities"),
    "model_kwargs": Choice({}, "CSRNet sec. 3 (back end B)"),
    "weight_init": Choice("auto", "CSRNet model.py _initialize_weights: N(0, 0.01), zero biases, on the back end; " + _HE),
    "fold": Choice({"*": None, "ucf-cc-50": 1}, "UCF_CC_50 5-fold cross-validation (as HMoDE sec. IV-A): a run per --fold 1-5"),
    "val_start": Choice(1, "CSRNet train.py: every epoch"),
    "val_every": Choice(1, "CSRNet train.py: every epoch"),
    "val_from_train": Choice(0.2, "ours: 20% held out, disjoint. CSRNet's part_A_val.json (59 of 300) and "
                                  "part_B_val.json (80 of 400) are inside part_*_train.json; the lists without them "
                                  "are part_*_train_with_val.json (240, 320)"),
    "fit_levels": Choice(False, "not an L2SM model"),
    "seed": Choice(0, "ours (CSRNet train.py: time.time())"),
}

RECIPES: dict[str, dict[str, Choice]] = {
    "hmode-released": _HMODE_RELEASED,
    "hmode-paper": _HMODE_PAPER,
    "l2sm-paper": _L2SM_PAPER,
    "csrnet": _CSRNET,
}
RECIPE_NAMES = tuple(RECIPES)

#: What each recipe is, one line each (README, --help).
SUMMARIES = {
    "hmode-released": "exactly what the authors' released HMoDE train.py does (model hmode-official); only its "
                      "ShanghaiTech A setting (SHHA) was released: on every other dataset its cells are the SHA "
                      "settings applied",
    "hmode-paper": "the HMoDE paper's text (sec. III, IV-B), the released code where the text is silent",
    "l2sm-paper": "the L2SM paper's text (sec. 3, 4.2)",
    "csrnet": "the CSRNet paper's recipe (ground truth, loss, SGD and rate); --rel adds REL (HMoDE Table X)",
}

_QUICK_EPOCHS = Choice(200, "ours: as HMoDE sec. IV-B2 (200 epochs)")
_QUICK_CONSTANT = Choice(None, "ours: a constant rate")
_QUICK_CROPS = {
    "crop": Choice(256, "ours: random crops of 256, as HMoDE sec. IV-B2 (128 on ShanghaiTech A, whose "
                        "spec says small_crop: crowdkernels.engine.config.QUICK_SMALL_CROP)"),
    "batch_size": Choice(8, "ours: 8 crops a step"),
}
_QUICK_WHOLE = {
    "crop": Choice(None, "ours: whole images, as L2SM sec. 4.2"),
    "batch_size": Choice(1, "ours: one whole image a step (their sizes differ)"),
}
_QUICK_HMODE = {
    "lr": Choice(2e-5, "ours: as HMoDE sec. IV-B2"),
    "epochs": _QUICK_EPOCHS,
    "lr_step": Choice(100, "ours: halved after 100 epochs, as HMoDE sec. IV-B2"),
    **_QUICK_CROPS,
}

#: ``train --model NAME`` without ``--recipe``: our settings for quick runs, one recipe per model (not a paper's:
#: those are :data:`RECIPES`); every other setting is the :class:`~crowdkernels.engine.config.TrainConfig`
#: default. :func:`crowdkernels.engine.config.quick_settings` adds what the dataset changes.
QUICK: dict[str, dict[str, Choice]] = {
    "hmode": {"model": Choice("hmode", "--model hmode"), **_QUICK_HMODE},
    "hmode-official": {"model": Choice("hmode-official", "--model hmode-official"), **_QUICK_HMODE},
    "l2sm": {"model": Choice("l2sm", "--model l2sm"), "lr": Choice(1e-4, "ours: as L2SM sec. 4.2"),
             "epochs": _QUICK_EPOCHS, "lr_step": _QUICK_CONSTANT, **_QUICK_WHOLE},
    "spn": {"model": Choice("spn", "--model spn"), "lr": Choice(1e-4, "ours: as L2SM sec. 4.2 (SPN: L2SM sec. 3.2)"),
            "epochs": _QUICK_EPOCHS, "lr_step": _QUICK_CONSTANT, **_QUICK_WHOLE},
    "csrnet": {"model": Choice("csrnet", "--model csrnet"), "lr": Choice(1e-5, "ours, with Adam (CSRNet sec. 3: SGD at 1e-6)"),
               "epochs": _QUICK_EPOCHS, "lr_step": _QUICK_CONSTANT, **_QUICK_CROPS},
}


def quick(model: str) -> dict[str, Any]:
    """The flat settings of :data:`QUICK`'s recipe for ``model``."""
    if model not in QUICK:
        raise ValueError(f"model must be one of {sorted(QUICK)}, got {model!r}")
    return {k: c.for_dataset(None) for k, c in QUICK[model].items()}


def _check(name: str) -> dict[str, Choice]:
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {list(RECIPES)}, got {name!r}")
    return RECIPES[name]


def resolve(name: str, dataset: str | None = None) -> dict[str, Any]:
    """The flat settings of recipe ``name`` for ``dataset`` (dotted keys, e.g. "target.sigma")."""
    return {k: c.for_dataset(dataset) for k, c in _check(name).items()}


def sources(name: str) -> dict[str, str]:
    """Where each setting of recipe ``name`` comes from."""
    return {k: c.source for k, c in _check(name).items()}


def _fmt(value) -> str:
    return "`" + json.dumps(value) + "`"


def _cell(choice: Choice) -> str:
    v = choice.value
    if isinstance(v, dict) and "*" in v:
        parts = [_fmt(v["*"])]
        others: dict[str, list[str]] = {}
        for ds in TABLE_DATASETS:
            if ds in v and v[ds] != v["*"]:
                others.setdefault(json.dumps(v[ds]), []).append(ds)
        parts += [f"`{val}` on {', '.join(dss)}" for val, dss in others.items()]
        text = "; ".join(parts)
    else:
        text = _fmt(v)
    return f"{text} ({choice.source})"


def table_keys() -> list[str]:
    """Every setting key of any recipe, in a stable order (first recipe's order, then the others' new keys)."""
    keys: list[str] = []
    for recipe in RECIPES.values():
        keys += [k for k in recipe if k not in keys]
    return keys


def markdown_table() -> str:
    """The README's recipe table: one row per setting, one column per recipe, each cell the value (per
    dataset where it differs) and its source; "-" where a recipe does not have the setting."""
    names = list(RECIPES)
    lines = ["| setting | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for key in table_keys():
        cells = [_cell(RECIPES[n][key]) if key in RECIPES[n] else "-" for n in names]
        lines.append(f"| `{key}` | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
