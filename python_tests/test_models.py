"""Models (issue 6): shapes, gradients, losses, torchvision/released-checkpoint loading, the L2SM criterion.

Most tests use small widths (width=0.125) and small inputs so that the file runs in about a minute on two CPU
cores; full-width models are only built for parameter counts and key layouts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import crowdkernels as ck
from crowdkernels.losses import assign_centers, fit_density_levels, multipolar_center_loss
from crowdkernels.models import CSRNet, HMoDE, L2SM, SPN, VGG16, official_key_map

W = 0.125
H_IMG, W_IMG = 200, 264  # not multiples of 16 (nor of 32)


def _batch(device, B=2, H=H_IMG, Wd=W_IMG, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, H, Wd, generator=g)
    points = [torch.rand(n, 2, generator=g) * torch.tensor([Wd - 1.0, H - 1.0]) for n in (25, 7)[:B]]
    density = ck.density_maps(points, (H, Wd))
    return images.to(device), {"density": density.to(device), "points": [p.to(device) for p in points]}


def _check_all_grads(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"


# ------------------------------------------------------------------------------------------ torchvision layout

def _torchvision_vgg16_keys(batch_norm):
    """torchvision's vgg16 / vgg16_bn `features.*` state_dict entries and shapes (written from its layout:
    configuration D, conv [+ BN] + ReLU per conv, a max pool after each stage)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    out, i, cin = {}, 0, 3
    for v in cfg:
        if v == "M":
            i += 1
            continue
        out[f"features.{i}.weight"] = (v, cin, 3, 3)
        out[f"features.{i}.bias"] = (v,)
        if batch_norm:
            for name in ("weight", "bias", "running_mean", "running_var"):
                out[f"features.{i + 1}.{name}"] = (v,)
            out[f"features.{i + 1}.num_batches_tracked"] = ()
        i += 3 if batch_norm else 2
        cin = v
    return out


def _torchvision_state_dict(batch_norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in _torchvision_vgg16_keys(batch_norm).items():
        sd[k] = torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
    sd["classifier.0.weight"] = torch.randn(4, 8, generator=g)  # ignored by the loader
    return sd


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_names_and_counts_match_torchvision(batch_norm):
    m = VGG16(batch_norm=batch_norm)
    own = {"features." + k: tuple(v.shape) for k, v in m.features.state_dict().items()}
    assert own == _torchvision_vgg16_keys(batch_norm)
    n = sum(p.numel() for p in m.parameters())
    assert n == (14_723_136 if batch_norm else 14_714_688)
    assert m.output_stride == 32
    assert [m.stage_spans[s][1] - m.stage_spans[s][0] for s in range(5)] == \
        [c * (3 if batch_norm else 2) for c in (2, 2, 3, 3, 3)]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_pretrained_from_torchvision_file(tmp_path, batch_norm):
    sd = _torchvision_state_dict(batch_norm)
    path = tmp_path / "vgg.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    m = VGG16(batch_norm=batch_norm, pretrained=str(path))
    for k, v in m.features.state_dict().items():
        assert torch.equal(v, sd["features." + k]), k
    # the models load the same file into their encoders / front ends
    if batch_norm:
        h = HMoDE(pretrained=path)
        assert torch.equal(h.encoder.features[40].weight, sd["features.40.weight"])
        assert torch.equal(h.encoder.features[41].running_var, sd["features.41.running_var"])
    else:
        c = CSRNet(pretrained=path)
        assert torch.equal(c.frontend.features[21].weight, sd["features.21.weight"])
        assert len(c.frontend.features) == 23  # conv4_3's ReLU is the last layer


def test_vgg16_stage_outputs_and_pools():
    m = VGG16(batch_norm=True, width=W, pools=(1, 2, 3, 4))
    outs = m(torch.randn(1, 3, 50, 70))
    assert [tuple(o.shape[-2:]) for o in outs] == [(50, 70), (25, 35), (12, 17), (6, 8), (3, 4)]
    assert [o.shape[1] for o in outs] == m.stage_channels == [8, 16, 32, 64, 64]


def test_pretrained_file_errors_come_before_the_width_check(tmp_path):
    """Issue 21, item 10: the real reason first: a missing file, or a file that is no weights file (an image, a
    web page), before "pretrained weights need width=1.0"; one line, without PyTorch's weights_only advice."""
    from crowdkernels.models.backbones import PretrainedWeightsError

    with pytest.raises(FileNotFoundError, match="not found"):
        VGG16(pretrained=tmp_path / "missing.pth", width=0.25)
    pictures = {"crowd.jpg": "a JPEG image", "crowd.png": "a PNG image"}
    for name, kind in pictures.items():
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html>Sign in to download</html>")
    pictures["page.pth"] = "an HTML or XML page"
    for name, kind in pictures.items():
        for width in (0.25, 1.0):
            with pytest.raises(PretrainedWeightsError) as err:
                VGG16(batch_norm=True, pretrained=tmp_path / name, width=width)
            msg = str(err.value)
            assert msg.startswith(f"{tmp_path / name}: not a PyTorch weights file ({kind}") and "\n" not in msg
            assert "weights_only" not in msg and "vgg16_bn-6c64b313.pth" in msg
    torch.save(_torchvision_state_dict(False), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    VGG16(pretrained=tmp_path / "legacy.pth")  # torch's old (pickle) format passes the check


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download.pytorch.org/models/vgg16_bn-6c64b313.pth"):
        VGG16(batch_norm=True, pretrained=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        CSRNet(pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="width"):
        VGG16(pretrained=_torchvision_state_dict(False), width=0.5)
    with pytest.raises(ck.models.backbones.PretrainedWeightsError, match="not a torchvision vgg16_bn") as err:
        VGG16(batch_norm=True, pretrained=_torchvision_state_dict(False))
    msg = str(err.value)
    assert "\n" not in msg and "missing: features.1.weight" in msg and "unexpected: features.2.weight" in msg


@pytest.mark.parametrize("wrap", ["plain", "no_num_batches_tracked", "state_dict", "model"])
def test_vgg16_bn_accepts_torchvision_files(tmp_path, wrap):
    """torchvision's published vgg16_bn file predates `num_batches_tracked` and carries the classifier; training
    checkpoints wrap the dict. (A whole pickled module is refused: test_safe_loading.py.)"""
    sd = _torchvision_state_dict(True)
    if wrap == "no_num_batches_tracked":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    obj = {"plain": sd, "no_num_batches_tracked": sd, "state_dict": {"state_dict": sd, "epoch": 3},
           "model": {"model": sd}}[wrap]
    torch.save(obj, tmp_path / "w.pth")
    m = VGG16(batch_norm=True, pretrained=tmp_path / "w.pth")
    for k, v in m.features.state_dict().items():
        if k.endswith("num_batches_tracked") and wrap == "no_num_batches_tracked":
            assert int(v) == 0
        else:
            assert torch.equal(v, sd["features." + k]), k


# ------------------------------------------------------------------------------------ forward, backward, loss

HMODE_CONFIGS = [
    dict(variant="paper"),
    dict(variant="official"),
    dict(variant="paper", fusion="average"),
    dict(experts=4, group_size=2),
    dict(experts=4, group_size=3),
]


@pytest.mark.parametrize("cfg", HMODE_CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_hmode_forward_backward(cfg, device):
    torch.manual_seed(0)
    model = HMoDE(width=W, **cfg).to(device)
    images, targets = _batch(device)
    out = model(images)
    K = cfg.get("experts", 3)
    M = math.comb(K, cfg.get("group_size", 2))
    official = cfg.get("variant") == "official"
    stride = 1 if official else (4 if K == 3 else 2)
    h, w = (H_IMG, W_IMG) if official else (math.ceil(H_IMG / stride), math.ceil(W_IMG / stride))
    assert model.stride == stride
    assert out.final.shape == (2, 1, h, w)
    assert len(out.experts) == K and all(e.shape == (2, 1, h, w) for e in out.experts)
    if cfg.get("fusion") == "average":
        assert out.group_maps is None and out.attention is None
        assert torch.allclose(out.final, sum(out.experts) / K)
        assert len(out.densities) == K + 1
    else:
        assert out.group_maps.shape == (2, M, h, w)
        assert out.importance.shape == (2, M, cfg.get("group_size", 2))
        # the paper variant pads to a multiple of 16, the official one floors as the released code
        att = (H_IMG // 16, W_IMG // 16) if official else (math.ceil(H_IMG / 16), math.ceil(W_IMG / 16))
        assert out.attention.shape == (2, 1) + att
        assert len(out.densities) == K + M + 1
    terms = model.criterion()(out, targets)
    assert set(terms) >= {"density", "total"}
    assert ("rel" in terms) == (not official)
    assert ("attention" in terms) == (cfg.get("fusion") != "average")
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    _check_all_grads(model)


@pytest.mark.parametrize("name", ["CSRNet", "SPN", "L2SM"])
def test_other_models_forward_backward(name, device):
    torch.manual_seed(0)
    model = {"CSRNet": CSRNet, "SPN": SPN, "L2SM": L2SM}[name](width=W).to(device)
    images, targets = _batch(device)
    out = model(images)
    s = model.stride
    assert s == (8 if name == "CSRNet" else 4)
    assert out.final.shape == (2, 1, math.ceil(H_IMG / s), math.ceil(W_IMG / s))
    if name == "SPN":
        assert [tuple(p.shape[-2:]) for p in out.pyramid] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    if name == "L2SM":
        n = out.boxes.shape[0]
        assert n > 0
        assert out.initial.shape == out.final.shape
        assert out.scale.shape == (2, 1, 4, 4) and bool(((out.scale > 1) & (out.scale < 2)).all())
        assert out.region_means.shape == (2, 16) and out.center_index.shape == (2, 16)
        assert out.region_scale.shape == (n,) and out.boxes.shape == (n, 5)
        assert out.repredictions.shape[:2] == (n, 1)
        assert int((out.center_index >= 0).sum()) == n
        # outside the selected regions the final density is the initial one
        keep = torch.ones_like(out.final, dtype=torch.bool)
        for b, y0, x0, hh, ww in out.boxes.tolist():
            keep[b, 0, y0:y0 + hh, x0:x0 + ww] = False
        assert torch.equal(out.final[keep], out.initial[keep])
    terms = model.criterion()(out, targets)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    _check_all_grads(model)


def test_full_width_shapes_and_counts():
    counts = {"CSRNet": 16_263_489, "SPN": 17_849_921, "L2SM": 19_417_475}
    for name, n in counts.items():
        assert sum(p.numel() for p in getattr(ck, name)().parameters()) == n, name
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        for variant in ("paper", "official"):
            m = HMoDE(variant=variant).eval()
            assert sum(p.numel() for p in m.parameters()) == 82_621_261
            out = m(x)
            h, w = (48, 80) if variant == "official" else (12, 20)
            assert out.final.shape == (1, 1, h, w) and out.group_maps.shape == (1, 3, h, w)
            assert out.importance.shape == (1, 3, 2) and out.attention.shape == (1, 1, 3, 5)


def test_criteria_bring_targets_to_output_grid_with_count_kept():
    images, targets = _batch("cpu", B=1, H=37, Wd=53)
    model = CSRNet(width=W)
    out = model(images)
    assert out.final.shape[-2:] == (5, 7)
    crit = model.criterion(rel=False, reduction="sum")
    gt = ck.models._common.density_at(targets["density"], 8, (5, 7))
    assert torch.allclose(gt.sum(), targets["density"].sum())
    assert torch.allclose(crit(out, targets)["total"], ((out.final - gt) ** 2).sum())


def test_official_criterion_weights_and_scale():
    torch.manual_seed(0)
    model = HMoDE(variant="official", width=W)
    images, targets = _batch("cpu", B=1, H=64, Wd=48)
    out = model(images)
    terms = model.criterion()(out, targets)
    gt = targets["density"] * 100
    dens = sum(w * ((d - gt) ** 2).sum() for w, d in zip([1, 1, 1, 2, 2, 2, 4], out.densities))
    assert torch.allclose(terms["density"], dens)
    assert "rel" not in terms
    assert torch.allclose(terms["total"], terms["density"] + terms["attention"] + terms["importance"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        HMoDE(variant="nope")
    with pytest.raises(ValueError, match="official"):
        HMoDE(variant="official", experts=4)
    with pytest.raises(ValueError, match="group_size"):
        HMoDE(experts=3, group_size=3)
    with pytest.raises(ValueError, match="width"):
        CSRNet(width=0)
    with pytest.raises(ValueError, match="images"):
        CSRNet(width=W)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="weights"):
        HMoDE(width=W).criterion(weights=[1, 2])


# ----------------------------------------------------------------------------------- released checkpoint keys

def _released_state_dict(seed=0):
    """A state_dict with the released HMoDE.py's key names (written from its module names: features1..5 =
    vgg16_bn.features[0:6], [6:13], [13:23], [23:33], [33:43]; Conv2d wrappers holding `.conv`) and the layer
    shapes of sec. IV-B / the released widths."""
    g = torch.Generator().manual_seed(seed)
    vgg = _torchvision_vgg16_keys(True)
    sd = {}
    for stage, (a, b) in enumerate([(0, 6), (6, 13), (13, 23), (23, 33), (33, 43)], start=1):
        for k, shape in vgg.items():
            i = int(k.split(".")[1])
            if a <= i < b:
                sd[f"features{stage}.{i - a}.{k.split('.', 2)[2]}"] = shape
    convs = {
        "de_pred3.0": (1024, 512, 3), "de_pred3.1": (512, 1024, 3),
        "de_pred2.0": (512, 1024, 3), "de_pred2.1": (256, 512, 3),
        "de_pred1.0": (256, 512, 3), "de_pred1.1": (128, 256, 3),
        "head3.0": (64, 512, 1), "head3.1": (1, 64, 1), "head2.0": (64, 256, 1), "head2.1": (1, 64, 1),
        "head1.0": (64, 128, 1), "head1.1": (1, 64, 1),
        "gating1.conv1": (256, 512, 3), "gating1.conv2": (6, 256, 1),
        "gating2.conv1": (1024, 512, 3), "gating2.conv2": (2048, 1024, 3), "gating2.conv3": (1024, 2048, 3),
        "gating2.conv4": (512, 1024, 3), "gating2.conv5": (256, 512, 3), "gating2.conv6": (3, 256, 1),
        "mask.conv1": (256, 512, 3), "mask.conv2": (128, 256, 3), "mask.output": (1, 128, 1),
    }
    for name, (o, i, k) in convs.items():
        sd[f"{name}.conv.weight"] = (o, i, k, k)
        sd[f"{name}.conv.bias"] = (o,)
    return {("module." + k): (torch.tensor(3) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
            for k, s in sd.items()}


def test_official_key_map_examples():
    assert official_key_map("module.features2.1.weight") == "encoder.features.7.weight"
    assert official_key_map("features5.9.running_mean") == "encoder.features.42.running_mean"
    assert official_key_map("de_pred3.1.conv.bias") == "decoder.2.2.bias"
    assert official_key_map("head1.0.conv.weight") == "heads.0.0.weight"
    assert official_key_map("gating2.conv6.conv.weight") == "gate2.10.weight"
    assert official_key_map("mask.output.conv.weight") == "attention.4.weight"
    with pytest.raises(KeyError, match="released"):
        official_key_map("classifier.0.weight")


def test_from_official_loads_released_names():
    sd = _released_state_dict()
    model = HMoDE.from_official({"model": sd, "epoch": 3})
    assert model.variant == "official"
    own = model.state_dict()
    assert len(own) == len(sd)
    for k, v in sd.items():
        assert torch.equal(own[official_key_map(k)], v), k
    # the decoder block for conv5 is de_pred3 and the finest head is head1
    assert torch.equal(model.decoder[2][0].weight, sd["module.de_pred3.0.conv.weight"])
    assert torch.equal(model.heads[0][2].bias, sd["module.head1.1.conv.bias"])


# ---------------------------------------------------------------------------------------------- L2SM criterion

def test_l2sm_criterion_on_known_region_densities(monkeypatch):
    """64 x 64 image, K = 4: region i (row-major, 16 x 16 px = 4 x 4 output cells) holds i heads, so its mean
    density on the stride-4 grid is i / 16. The SPN's density is replaced by the ground truth itself."""
    torch.manual_seed(0)
    pts = []
    for i in range(16):
        ry, rx = divmod(i, 4)
        for j in range(i):
            a, b = divmod(j, 4)
            pts.append([16 * rx + 4.5 + 2 * b, 16 * ry + 4.5 + 2 * a])
    points = [torch.tensor(pts, dtype=torch.float32).reshape(-1, 2)]
    density = ck.density_maps(points, (64, 64), sigma=1.0)
    targets = {"density": density, "points": points}
    model = L2SM(width=W)
    gt_means = model.ground_truth_region_means(density)
    expected = torch.arange(16, dtype=torch.float32)[None] / 16
    assert torch.allclose(gt_means, expected, atol=1e-6)
    levels = model.fit_levels([{"density": density}])                   # from ground-truth batches
    assert torch.allclose(levels, fit_density_levels(expected, 5))
    assert bool(model.levels_fitted)
    # levels half a step above those (3.5/16, 6.5/16, ...), so that no region mean sits on a threshold
    levels = model.fit_levels(expected + 1 / 32)
    assert torch.equal(model.density_levels, levels)

    gt_grid = ck.models._common.density_at(density, 4, (16, 16))
    run = model.spn.run

    def run_with_gt_density(x):
        d, conv5, pooled = run(x)
        return gt_grid + 0 * d, conv5, pooled

    monkeypatch.setattr(model.spn, "run", run_with_gt_density)
    out = model(torch.randn(1, 3, 64, 64))
    _, idx = assign_centers(expected, levels, 3)
    assert torch.equal(out.center_index, idx)
    assert out.boxes.shape[0] == int((idx >= 0).sum()) == 9          # the densest 3 of 5 levels: 7..15 heads
    crit = model.criterion(sigma=1.0, lambda2=0.5)
    centers = crit.center_loss.centers.clone()
    terms = crit(out, targets)
    assert float(terms["density"].detach()) < 1e-10
    l_c = multipolar_center_loss(expected, out.scale.flatten(1), idx, centers)
    assert torch.allclose(terms["center"], l_c)
    target, valid = crit.region_targets(out, targets)
    region = out.boxes[:, 1] // 4 * 4 + out.boxes[:, 2] // 4
    for n in range(out.boxes.shape[0]):               # every zoomed head lands in the valid part
        assert abs(float(target[n, 0][valid[n]].sum()) - int(region[n])) < 1e-3
    l_r = (((out.repredictions - target) ** 2)[:, 0] * valid).sum()
    assert torch.allclose(terms["reprediction"], l_r)
    assert torch.allclose(terms["total"], terms["density"] + terms["reprediction"] + 0.5 * terms["center"])
    assert not torch.equal(crit.center_loss.centers, centers)   # eq. 1 moved the centres


# ------------------------------------------------------------------ the paper's stated details, the released code

def _kinds(seq):
    """('conv3', 'relu', 'conv1', ...) for a Sequential: conv<k> for a k x k conv."""
    out = []
    for m in seq:
        if isinstance(m, torch.nn.Conv2d):
            out.append(f"conv{m.kernel_size[0]}")
        elif isinstance(m, torch.nn.ReLU):
            out.append("relu")
        elif isinstance(m, torch.nn.Sigmoid):
            out.append("sigmoid")
        else:
            out.append(type(m).__name__)
    return tuple(out)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_hmode_layers_are_the_papers_text(variant):
    """Sec. IV-B1 and III-B1, as stated in the text; both variants have these layers."""
    m = HMoDE(variant=variant, width=W)
    # "the first 13 convolutional layers of the VGG-16 BN"
    convs = [x for x in m.encoder.features if isinstance(x, torch.nn.Conv2d)]
    bns = [x for x in m.encoder.features if isinstance(x, torch.nn.BatchNorm2d)]
    assert len(convs) == 13 and len(bns) == 13 and m.encoder.batch_norm
    # "three blocks, each with two 3x3 conv + ReLU layers"
    assert len(m.decoder) == 3 and all(_kinds(b) == ("conv3", "relu") * 2 for b in m.decoder)
    # "a density regression head consisting of two additional 1x1 conv + ReLU layers"
    assert len(m.heads) == 3 and all(_kinds(h) == ("conv1", "relu") * 2 for h in m.heads)
    # "G1 as two convolutional layers with each followed by a ReLU while G2 triples the number of layers to six"
    assert [k for k in _kinds(m.gate1) if k != "relu"] == ["conv3", "conv1"] and _kinds(m.gate1)[1::2] == ("relu",) * 2
    g2 = _kinds(m.gate2)
    assert len([k for k in g2 if k.startswith("conv")]) == 6 and g2[1::2] == ("relu",) * 6
    assert m.gate1[-2].out_channels == 6 and m.gate2[-2].out_channels == 3  # M x N and M, K = 3, N = 2
    # "an attention net consists of three convolutional layers followed by the Sigmoid"
    att = _kinds(m.attention)
    assert len([k for k in att if k.startswith("conv")]) == 3 and att[-1] == "sigmoid"
    # skips from conv4_3 and conv3_3 into the second and third blocks (concatenated)
    assert m.decoder[1][0].in_channels == m.encoder.stage_channels[3] + m.decoder[2][-2].out_channels
    assert m.decoder[0][0].in_channels == m.encoder.stage_channels[2] + m.decoder[1][-2].out_channels
    assert m.num_experts == 3 and m.group_size == 2 and m.groups.tolist() == [[0, 1], [0, 2], [1, 2]]


def test_hmode_paper_gates_see_relu_logits_and_heads_are_nonnegative(monkeypatch):
    """Behaviour, not only layer lists: every expert map is >= 0 (a ReLU ends each head) and the logits that
    reach the gating op are >= 0 (a ReLU ends each gate), on random weights whose raw outputs have both signs."""
    from crowdkernels.models import hmode as hmode_module

    seen = {}
    real = hmode_module.hierarchical_gating

    def spy(experts, g1, g2, groups, **kw):
        seen.update(g1=g1.detach(), g2=g2.detach(), kw=kw)
        return real(experts, g1, g2, groups, **kw)

    monkeypatch.setattr(hmode_module, "hierarchical_gating", spy)
    torch.manual_seed(0)
    m = HMoDE(width=W)
    for seq in (m.gate1, m.gate2, *m.heads):  # give the last conv a negative bias: raw outputs change sign
        torch.nn.init.constant_(seq[-2].bias, -0.05)
    out = m(torch.randn(1, 3, 64, 64))
    assert all(bool((e >= 0).all()) for e in out.experts)
    assert bool((seen["g1"] >= 0).all()) and bool((seen["g2"] >= 0).all())
    assert bool((seen["g1"] == 0).any()), "the ReLU never clipped: the test would not see a missing one"
    assert seen["kw"]["upsample"] == "nearest"


def test_hmode_paper_criterion_is_eq7_at_input_resolution():
    """The paper variant's criterion: eq. 7 with unit weights, eq. 3 and 5 as means over pixels, REL (eq. 2) on
    every output, all at the input resolution (sec. III-D), restated here from the equations."""
    torch.manual_seed(0)
    m = HMoDE(width=W)
    images, targets = _batch("cpu", B=1, H=64, Wd=96)
    out = m(images)
    crit = m.criterion()
    assert crit.weights == [1.0] * 7 and crit.reduction == "mean" and crit.rel and crit.resolution == "input"
    terms = crit(out, targets)
    gt = targets["density"]
    up = [torch.nn.functional.interpolate(d, scale_factor=4, mode="nearest") / 16 for d in out.densities]
    dens = sum(((u - gt) ** 2).mean() for u in up)
    rel = sum(ck.losses.relative_local_count_loss(u, gt, region=0.125, num_hard=9, num_sublists=3, pairs="adjacent")
              for u in up)
    a = torch.nn.functional.interpolate(out.attention, size=gt.shape[-2:], mode="nearest")
    y = (gt > 1e-5).float()
    att = -(y * torch.log(a) + (1 - y) * torch.log(1 - a)).mean()
    imp = ck.losses.expert_importance_loss(out.importance, per_image=True)
    torch.testing.assert_close(terms["density"], dens)
    torch.testing.assert_close(terms["rel"], rel)
    torch.testing.assert_close(terms["attention"], att)
    torch.testing.assert_close(terms["total"], dens + rel + att + imp)


@pytest.mark.parametrize("training", [False, True])
def test_official_forward_matches_the_released_forward(training):
    """Our official variant against HMoDE.py's forward restated from its arithmetic (released_hmode.py), on the
    same weights under the released names; odd input sizes, where the released pools floor."""
    from released_hmode import released_forward, released_state_dict

    torch.manual_seed(1)
    m = HMoDE(variant="official", width=W).double()
    with torch.no_grad():  # BN statistics that are not the identity, so eval mode uses them
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    m.train(training)
    sd = {k: v.clone() for k, v in released_state_dict(m).items()}
    x = torch.randn(2, 3, 75, 101, dtype=torch.float64)
    out = m(x)
    densities, amp, imp = released_forward(sd, x, training=training)
    assert len(out.densities) == len(densities) == 7
    for ours, theirs in zip(out.densities, densities):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.attention, amp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ck.losses.expert_importance_loss(out.importance), imp.double(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ L2SM in fixed shapes (the export path)
from crowdkernels.models.l2sm import _region_zoom  # noqa: E402
from crowdkernels.models._common import out_size, pad_to_multiple  # noqa: E402
from crowdkernels.ops.reference import scale_regions_reference, unscale_regions_reference  # noqa: E402

# factors in (1, 2), and ones where r * side is an integer (the valid extent's floor sits exactly on it)
ZOOM_CASES = [(5, 7, 10, 14, [1.0001, 1.37, 1.5, 1.999, 2.0, 1.2]), (4, 6, 8, 12, [1.25, 1.75, 1.5, 1.1]),
              (1, 1, 2, 2, [1.3, 2.0])]


@pytest.mark.parametrize("h, w, sh, sw, factors", ZOOM_CASES)
def test_region_zoom_equals_the_region_references(h, w, sh, sw, factors):
    """`_region_zoom` (interpolation matrices, every region of one size) against scale_regions_reference and
    unscale_regions_reference (per box, from sec. 3.3's sampling), in float64."""
    g = torch.Generator().manual_seed(len(factors) + h)
    n = len(factors)
    r = torch.tensor(factors, dtype=torch.float64)
    features = torch.randn(n, 3, h, w, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[b, 0, 0, h, w] for b in range(n)], dtype=torch.int64)
    want = scale_regions_reference(features, boxes, r, (sh, sw))
    torch.testing.assert_close(_region_zoom(features, r, (sh, sw), down=False), want, rtol=1e-12, atol=1e-12)
    pred = torch.randn(n, 1, sh, sw, generator=g, dtype=torch.float64)
    want = unscale_regions_reference(pred, boxes, r, torch.full((n, 1, h, w), float("nan"), dtype=torch.float64))
    got = r[:, None, None, None] ** 2 * _region_zoom(pred, r, (h, w), down=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _every_region(model, images):
    h, w = out_size(images.shape[-2:], model.stride)
    initial, conv5, pooled = model.spn.run(pad_to_multiple(images, model.forward_multiple))
    return model._forward_every_region(initial, conv5, model._scale_map(pooled), h, w)


@pytest.mark.parametrize("fitted", [False, True])
@pytest.mark.parametrize("size", [(64, 96), (61, 77)])
def test_l2sm_every_region_path_equals_forward(size, fitted):
    """The fixed-shape forward torch.export traces (every region re-predicted, the selection by torch.where)
    gives forward's maps and selection, with the batch's quantiles or with fitted levels, in float64; the
    selection is mixed, so both branches of the where are compared."""
    torch.manual_seed(0)
    model = L2SM(width=W).double().eval()
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    if fitted:
        model.fit_levels(torch.rand(200, dtype=torch.float64) * model(images).region_means.max())
    with torch.no_grad():
        want, got = model(images), _every_region(model, images)
    selected = want.center_index >= 0
    assert bool(selected.any()) and not bool(selected.all())
    torch.testing.assert_close(got.center_index, want.center_index)
    torch.testing.assert_close(got.region_means, want.region_means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.final, want.final, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.initial, want.initial)
    assert got.final.shape == (2, 1, *out_size(size, 4))
