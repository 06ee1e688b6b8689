"""Training recipes (issue 13): the released HMoDE training step and test pipeline restated from the authors'
code (python_tests/released_hmode.py) and compared with crowdkernels; pretrained encoders; the README's
recipe table against --print-config; the options around them (--val-from-train, --resume, ...)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crowdkernels as ck
from crowdkernels import cli
from crowdkernels.engine import recipes
from crowdkernels.engine.config import build_config
from crowdkernels.engine.pipeline import split_off
from crowdkernels.engine.trainer import Trainer, build_run
from released_hmode import (LOG_PARA, LR, released_count, released_forward, released_image_tensor,
                            released_state_dict, released_train_loss)
from test_density import matlab_recipe

REPO = Path(__file__).resolve().parents[1]


def _folder(tmp_path, n=1, size=(72, 104), heads=23, seed=0, ext="png"):
    """n images (uint8 PNG: lossless, so every pipeline reads the same pixels) with point files."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "crowds"
    root.mkdir()
    H, W = size
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / f"img{i}.{ext}")
        # non-integer coordinates: a flipped map and the map of flipped points are then the same (matlab style)
        pts = rng.uniform(0.5, 1.0, (heads, 2)) * [W - 1, H - 1] + rng.uniform(0.1, 0.4, (heads, 2))
        np.savetxt(root / f"img{i}.txt", pts)
    return root


class _Inputs:
    """Records every image batch a model is fed (a forward pre-hook)."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].detach().clone()))


# ------------------------------------------------------------------------------- the released training step

def test_hmode_released_step_matches_the_released_train_step(tmp_path):
    """One step of `--recipe hmode-released` against released train.py's step restated from its arithmetic:
    the same image and initial weights give the same loss and, after Adam, the same parameters."""
    root = _folder(tmp_path)
    cfg = build_config(recipe="hmode-released", dataset="folder",
                       overrides={"model_kwargs.width": 0.25, "epochs": 1, "workers": 0, "quiet": True})
    cfg.root, cfg.out = str(root), str(tmp_path / "run")
    torch.manual_seed(3)
    model, criterion, train_set, val_set = build_run(cfg)
    assert model.variant == "official" and model.density_scale == LOG_PARA
    start = copy.deepcopy(model.state_dict())
    inputs = _Inputs(model)
    seen_loss = []
    criterion.register_forward_hook(lambda m, args, result: seen_loss.append(float(result["total"].detach())))
    summary = Trainer(model, criterion, train_set, val_set, cfg).run()
    assert summary["epoch"] == 1 and len(seen_loss) == 1

    # --- the released step, restated: img_transform, SASNet sigma-4 map x LOG_PARA, flip as the loader drew it
    rgb = np.asarray(Image.open(root / "img0.png").convert("RGB"))
    x = released_image_tensor(rgb)
    pts = np.loadtxt(root / "img0.txt")
    gt = torch.from_numpy(matlab_recipe(pts, rgb.shape[:2]).astype(np.float32)) * LOG_PARA
    fed = inputs.seen[0]  # the training step (the last epoch's validation comes after)
    flipped = torch.equal(fed, x.flip(-1))
    assert flipped or torch.equal(fed, x), "the recipe must feed the released img_transform's tensor"
    if flipped:  # RandomHorizontallyFlip transposes image and density map together
        x, gt = x.flip(-1), gt.flip(-1)
    ref = ck.HMoDE(variant="official", width=0.25)
    ref.load_state_dict(start)
    ref.train()
    sd = {k: (v.detach().clone().requires_grad_(v.is_floating_point() and "running" not in k)) for k, v in
          released_state_dict(ref).items()}
    densities, amp, imp = released_forward(sd, x, training=True)
    loss = released_train_loss(densities, amp, imp, gt[None])
    params = [v for v in sd.values() if v.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    opt.zero_grad()
    loss.backward()
    opt.step()

    assert seen_loss[0] == pytest.approx(float(loss.detach()), rel=1e-5)
    after = model.state_dict()
    from crowdkernels.models import official_key_map

    bn_fed_bias = {f"encoder.features.{i}.bias" for i, m in enumerate(model.encoder.features)
                   if isinstance(m, torch.nn.Conv2d)}  # each followed by a BatchNorm: true gradient 0
    checked = 0
    for k, v in sd.items():
        ours = after[official_key_map(k)]
        if not v.requires_grad:
            continue
        if official_key_map(k) in bn_fed_bias:
            # rounding noise is their whole gradient, so Adam's first step moves them by about +-lr at random
            assert (ours - start[official_key_map(k)]).abs().max() <= LR * 1.001
            assert (v.detach() - start[official_key_map(k)]).abs().max() <= LR * 1.001
            continue
        # Adam's first step is lr * g / (|g| + eps): where |g| is near eps (1e-8) the two implementations'
        # rounding in g moves it by up to lr, so a few in 10^5 elements may differ by more than 1e-6, never by lr
        diff = (ours - v.detach()).abs()
        off = int((diff > 1e-6).sum())
        assert off <= max(1, diff.numel() // 100_000) and float(diff.max()) <= LR, (k, off, float(diff.max()))
        checked += 1
    assert checked > 60
    # the step moved the weights (a test of equal parameters must not pass on an untouched model)
    assert (after["decoder.0.0.weight"] - start["decoder.0.0.weight"]).abs().max() > LR / 2


# ------------------------------------------------------------------------------- the released checkpoints

@pytest.fixture(scope="module")
def released_files(tmp_path_factory):
    """The authors' two checkpoint layouts, from random weights at full width: their plain state_dict (what
    test.py loads) and their training checkpoint {"model": {"module." keys}, "optimizer", ...}."""
    tmp = tmp_path_factory.mktemp("released")
    torch.manual_seed(5)
    model = ck.HMoDE(variant="official")
    with torch.no_grad():  # a live map: positive last biases so the ReLUs pass something
        for seq in model.heads:
            seq[-2].bias.fill_(0.02)
    sd = {k: v.clone() for k, v in released_state_dict(model).items()}
    plain = tmp / "best_model.pth"
    torch.save(sd, plain)
    training = tmp / "latestmodel.pth"
    torch.save({"epoch": 99, "i_tb": 4, "model": {"module." + k: v for k, v in sd.items()}, "optimizer": {},
                "record": {"best_mae": np.float64(60.5), "mse": 1e20}}, training)
    return {"plain": plain, "training": training, "sd": sd}


@pytest.mark.slow
def test_released_checkpoints_count_as_released_test_py(released_files, tmp_path, capsys):
    """A released file, in either layout, counts the same through `eval`, `count --json` and the library as the
    released test.py pipeline restated: ToTensor + Normalize, net(img)[0][-1] unpadded, sum / 100."""
    root = _folder(tmp_path, n=1, size=(75, 101), heads=9)
    rgb = np.asarray(Image.open(root / "img0.png").convert("RGB"))
    with torch.no_grad():
        densities, _, _ = released_forward(released_files["sd"], released_image_tensor(rgb))
    want = released_count(densities[-1])
    assert abs(want) > 1e-3  # a live prediction
    for layout in ("plain", "training"):
        path = str(released_files[layout])
        assert cli.main(["count", str(root / "img0.png"), "--checkpoint", path, "--json", "--device", "cpu"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got[0]["count"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        report = tmp_path / f"eval-{layout}.json"
        assert cli.main(["eval", "--checkpoint", path, "--dataset", "folder", "--root", str(root), "--workers", "0",
                         "--device", "cpu", "--out", str(report)]) == 0
        capsys.readouterr()
        per = json.loads(report.read_text())["per_image"]
        assert per[0]["pred"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        counter = ck.load(path, device="cpu")
        assert counter.count(str(root / "img0.png")) == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert counter.count(rgb) == pytest.approx(want, rel=1e-5, abs=1e-6)
        net, ckpt = ck.engine.checkpoint.model_from_checkpoint(path)
        assert ckpt["released"] and ckpt["model_name"] == "hmode-official"
        assert net.input_multiple == 1 and net.density_scale == 100.0


def test_init_from_released_files_and_our_checkpoints(released_files, tmp_path):
    """--init takes both released layouts (into hmode-official and into the paper variant: same layers) and our
    own checkpoints; the weights arrive unchanged."""
    from crowdkernels.engine.checkpoint import load_initial_weights
    from crowdkernels.models import official_key_map

    sd = released_files["sd"]
    for name in ("hmode-official", "hmode"):
        for layout in ("plain", "training"):
            model = ck.models.build_model(name)
            assert load_initial_weights(model, released_files[layout]) == "released"
            own = model.state_dict()
            for k in ("features3.4.weight", "gating2.conv6.conv.bias", "head1.1.conv.weight", "mask.output.conv.bias"):
                assert torch.equal(own[official_key_map(k)], sd[k])
    with pytest.raises(ck.engine.checkpoint.CheckpointError, match="released HMoDE"):
        load_initial_weights(ck.CSRNet(width=0.125), released_files["plain"])
    with pytest.raises(ck.engine.checkpoint.CheckpointError, match="K = 3, N = 2"):
        load_initial_weights(ck.HMoDE(experts=4, width=1.0), released_files["plain"])


# ------------------------------------------------------------------------------- pretrained encoders

def _torchvision_file(tmp_path, batch_norm, seed=0, drop_tracked=True):
    """A torchvision vgg16(_bn) state_dict as torchvision publishes it: features + classifier; the published
    vgg16_bn file predates num_batches_tracked."""
    torch.manual_seed(seed)
    net = ck.VGG16(batch_norm=batch_norm)
    sd = {"features." + k: v.clone().normal_() if v.is_floating_point() else v
          for k, v in net.features.state_dict().items()
          if not (drop_tracked and k.endswith("num_batches_tracked"))}
    sd["classifier.0.weight"] = torch.randn(8, 4)
    sd["classifier.0.bias"] = torch.randn(8)
    path = tmp_path / ("vgg16_bn.pth" if batch_norm else "vgg16.pth")
    torch.save(sd, path)
    return path, sd


ENCODERS = {"hmode": ("encoder", True, 13), "hmode-official": ("encoder", True, 13), "l2sm": ("spn.backbone", False, 13),
            "spn": ("backbone", False, 13), "csrnet": ("frontend", False, 10)}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_pretrained_loads_into_every_models_encoder(tmp_path, name):
    attr, bn, convs = ENCODERS[name]
    path, sd = _torchvision_file(tmp_path, bn)
    cfg = build_config(model=name, dataset="synthetic", overrides={"pretrained": str(path), "synthetic": {"train": 2, "val": 1, "size": 32}})
    model, *_ = build_run(cfg)
    enc = model
    for part in attr.split("."):
        enc = getattr(enc, part)
    loaded = [m for m in enc.features if isinstance(m, torch.nn.Conv2d)]
    assert len(loaded) == convs
    for i, m in enumerate(enc.features):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            assert torch.equal(m.weight, sd[f"features.{i}.weight"]) and torch.equal(m.bias, sd[f"features.{i}.bias"])
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.running_var, sd[f"features.{i}.running_var"])


def test_pretrained_wrong_file_gets_one_line(tmp_path, capsys):
    path, _ = _torchvision_file(tmp_path, batch_norm=False)  # a vgg16 file for a vgg16_bn encoder
    code = cli.main(["train", "--model", "hmode", "--pretrained", str(path), "--out", str(tmp_path / "run"),
                     "--workers", "0", "--synthetic", "2", "1", "32", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "not a torchvision vgg16_bn state_dict" in err[0] and "missing: features.1.weight" in err[0]
    assert "download.pytorch.org/models/vgg16_bn" in err[0]
    code = cli.main(["train", "--model", "csrnet", "--pretrained", str(tmp_path / "nope.pth"), "--out",
                     str(tmp_path / "run2"), "--workers", "0", "--synthetic", "2", "1", "32", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "never downloads" in err[0]


# ------------------------------------------------------------------------------- the README's recipe table

def _readme_table() -> dict:
    text = (REPO / "README.md").read_text()
    table = recipes.markdown_table()
    assert table in text, "the README's recipe table is not recipes.markdown_table(): regenerate it"
    rows = [line for line in table.splitlines()[2:]]
    header = [c.strip().strip("`") for c in table.splitlines()[0].strip("|").split("|")]
    out = {}
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]
        out[cells[0].strip("`")] = dict(zip(header[1:], cells[1:]))
    return out


def _cell_value(cell: str, dataset: str):
    """The value a README cell gives for `dataset`: its first `...` unless a "`v` on d1, d2" part names it."""
    if cell == "-":
        return "-"
    text = cell.split(" (", 1)[0]
    parts = text.split("; ")
    value = json.loads(parts[0].strip("`"))
    for part in parts[1:]:
        m = re.fullmatch(r"`(.*)` on (.*)", part)
        if m and dataset in [d.strip() for d in m.group(2).split(",")]:
            value = json.loads(m.group(1))
    return value


def _config_value(config: dict, key: str):
    head, _, rest = key.partition(".")
    v = config[head]
    return v.get(rest, "-") if rest else v


@pytest.mark.parametrize("name", recipes.RECIPE_NAMES)
@pytest.mark.parametrize("dataset", ["shanghaitech-a", "shanghaitech-b", "ucf-cc-50", "ucf-qnrf"])
def test_print_config_equals_the_readme_table(name, dataset, capsys):
    table = _readme_table()
    assert cli.main(["train", "--recipe", name, "--dataset", dataset, "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["recipe"] == name
    for key, cells in table.items():
        want = _cell_value(cells[name], dataset)
        if want == "-":
            continue
        got = _config_value(config, key)
        if key == "input_norm":
            got = "imagenet" if got == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]} else got
        assert got == want, f"{name} on {dataset}: {key} is {got!r}, the README says {want!r}"


def test_recipe_sources_are_cited():
    for name in recipes.RECIPE_NAMES:
        for key, src in recipes.sources(name).items():
            assert src and len(src) > 6, (name, key)
    # the paper recipe follows the text where the text speaks
    paper = recipes.sources("hmode-paper")
    for key in ("crop", "flip", "lr", "epochs", "lr_step", "criterion_kwargs.weights", "criterion_kwargs.rel_options"):
        assert paper[key].startswith("HMoDE"), key
    assert recipes.sources("l2sm-paper")["lr"].startswith("L2SM sec. 4.2")


def test_flags_override_single_values(capsys):
    assert cli.main(["train", "--recipe", "hmode-paper", "--dataset", "shanghaitech-a", "--print-config", "--no-rel",
                     "--loss-weights", "1,1,1,2,2,2,4", "--crop", "64", "--lr", "1e-4", "--sigma", "adaptive",
                     "--target-style", "exact", "--target-scale", "1", "--set", "criterion_kwargs.reduction=\"sum\""]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["criterion_kwargs"]["rel"] is False and c["criterion_kwargs"]["weights"] == [1, 1, 1, 2, 2, 2, 4]
    assert c["crop"] == 64 and c["lr"] == 1e-4 and c["target"]["sigma"] == "adaptive"
    assert c["target"]["style"] == "exact" and c["target"]["scale"] == 1.0
    assert c["criterion_kwargs"]["reduction"] == "sum"
    # untouched values stay the recipe's
    assert c["epochs"] == 200 and c["criterion_kwargs"]["resolution"] == "input" and c["batch_size"] == 1
    assert cli.main(["train", "--recipe", "csrnet", "--print-config", "--set", "nonsense=1"]) == 2
    assert "unknown setting 'nonsense'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- options around the recipes

def test_val_from_train_is_a_seeded_disjoint_split(tmp_path):
    root = _folder(tmp_path, n=12, size=(24, 32), heads=3)
    cfg = build_config(model="csrnet", dataset="folder", overrides={"val_from_train": 0.25, "seed": 4, "crop": None})
    cfg.root = str(root)
    _, _, train, val = build_run(cfg)
    tn, vn = {s.name for s in train.samples}, {s.name for s in val.samples}
    assert len(vn) == 3 and len(tn) == 9 and not tn & vn and len(tn | vn) == 12
    cfg.seed = 4
    _, _, _, again = build_run(cfg)
    assert {s.name for s in again.samples} == vn
    cfg.seed = 5
    _, _, _, other = build_run(cfg)
    assert {s.name for s in other.samples} != vn
    with pytest.raises(ValueError, match="fraction"):
        split_off(train.samples, 1.5, 0)


def test_resume_refuses_changed_settings_and_takes_its_own(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--model", "csrnet", "--width", "0.125", "--out", str(out), "--workers", "0", "--synthetic", "4", "2", "32",
            "--crop", "32", "--batch-size", "2", "--lr", "1e-3"]
    assert cli.main(base + ["--epochs", "1"]) == 0
    capsys.readouterr()
    # a bare --resume continues with the run's own settings (not the defaults of the flags)
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "2", "--workers", "0"]) == 0
    assert "after 2 epoch(s)" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 1e-3 and cfg["batch_size"] == 2 and cfg["epochs"] == 2 and cfg["model"] == "csrnet"
    # a new lr, batch and crop: refused, each named
    assert cli.main(base + ["--epochs", "3", "--resume", "--lr", "5e-4", "--batch-size", "4", "--crop", "16"]) == 2
    err = capsys.readouterr().err
    assert "lr 0.0005 (the run's: 0.001)" in err and "batch_size 4 (the run's: 2)" in err and "crop 16 (the run's: 32)" in err
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    # an unknown setting on --resume: one line, exit 2 (not a traceback)
    assert cli.main(["train", "--out", str(out), "--resume", "--set", "nonsense=1"]) == 2
    assert "unknown setting 'nonsense'" in capsys.readouterr().err


def test_only_rank_0_prints_the_summary(tmp_path, capsys, monkeypatch):
    """Under torchrun every process ran `train`; after the process group is gone each would call itself rank 0."""
    from crowdkernels.engine import distributed

    state = {"group": False}
    monkeypatch.setattr(distributed, "init_from_env", lambda *a: state.update(group=True) or True)
    monkeypatch.setattr(distributed, "cleanup", lambda: state.update(group=False))
    monkeypatch.setattr(distributed, "is_main", lambda: not state["group"])  # rank 1 while the group lives
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    assert cli.main(["train", "--model", "csrnet", "--width", "0.125", "--out", str(tmp_path / "r"), "--workers", "0",
                     "--synthetic", "2", "1", "32", "--epochs", "1", "--crop", "32"]) == 0
    assert capsys.readouterr().out == ""


def test_warnings_for_amp_on_cpu_and_missing_pretrained(tmp_path, capsys):
    assert cli.main(["train", "--recipe", "csrnet", "--width", "0.125", "--out", str(tmp_path / "r"), "--workers", "0",
                     "--synthetic", "2", "1", "32", "--epochs", "1", "--amp", "--device", "cpu", "--set", "patches=null"]) == 0
    err = capsys.readouterr().err
    assert "--amp has no effect on the cpu" in err
    assert "starts from ImageNet vgg16 weights, but no --pretrained" in err


def test_a_crop_larger_than_the_images_is_said(tmp_path, capsys):
    root = _folder(tmp_path, n=3, size=(40, 48), heads=3)
    cfg = build_config(model="csrnet", dataset="folder", overrides={"crop": 64, "model_kwargs.width": 0.125})
    cfg.root = str(root)
    said = []
    build_run(cfg, warn=said.append)
    assert any("2 training image(s) are smaller than --crop 64" in m and "1.6x" in m for m in said), said


def test_one_input_convention_for_training_eval_and_count(tmp_path, capsys, monkeypatch):
    """The same image reaches the model as the same tensor in training (no crop, no flip), `eval`, `count` and
    `crowdkernels.load`."""
    from crowdkernels.models import registry

    root = _folder(tmp_path, n=1, size=(48, 64), heads=5)
    fed = {}
    real_build = registry.MODEL_BUILDERS["csrnet"]

    def spy_build(**kw):
        model = real_build(**kw)
        model.register_forward_pre_hook(lambda m, a: fed.setdefault(spy_build.where, []).append(a[0].detach().clone()))
        return model

    monkeypatch.setitem(registry.MODEL_BUILDERS, "csrnet", spy_build)
    spy_build.where = "train"
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "csrnet", "--width", "0.125", "--dataset", "folder", "--root", str(root),
                     "--out", str(out), "--workers", "0", "--epochs", "1", "--crop", "0", "--no-flip",
                     "--set", "multiple=16"]) == 0
    spy_build.where = "eval"
    assert cli.main(["eval", "--checkpoint", str(out / "last.pt"), "--dataset", "folder", "--root", str(root),
                     "--workers", "0", "--device", "cpu"]) == 0
    spy_build.where = "count"
    assert cli.main(["count", str(root / "img0.png"), "--checkpoint", str(out / "last.pt"), "--device", "cpu"]) == 0
    spy_build.where = "load"
    ck.load(out / "last.pt", device="cpu").count(str(root / "img0.png"))
    capsys.readouterr()
    train_in = fed["train"][0]  # the training step (validation comes after)
    rgb = torch.from_numpy(np.array(Image.open(root / "img0.png"))).permute(2, 0, 1).float() / 255
    want = ck.data.transforms.normalize_image(rgb, ck.data.transforms.IMAGENET_NORM)[None]
    torch.testing.assert_close(train_in, want, rtol=0, atol=1e-6)
    for where in ("eval", "count", "load"):
        torch.testing.assert_close(fed[where][0], want, rtol=0, atol=1e-6, msg=where)
    assert all(t.shape == want.shape for w in fed.values() for t in w)


# ------------------------------------------------------------------------------- data pieces of the recipes

def test_csrnet_nine_patches():
    from crowdkernels.data.patches import NinePatches

    img = torch.arange(3 * 6 * 8, dtype=torch.float32).reshape(3, 6, 8)
    pts = torch.tensor([[1.5, 0.5], [6.5, 1.5], [2.5, 4.5], [7.5, 5.5]])

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": img, "points": pts, "name": "a", "index": i}

    ds = NinePatches(One())
    assert len(ds) == 18
    quarters = [ds[2 * p] for p in range(4)]
    assert [q["image"].shape[-2:] for q in quarters] == [(3, 4)] * 4
    assert torch.equal(torch.cat([torch.cat([quarters[0]["image"], quarters[1]["image"]], -1),
                                  torch.cat([quarters[2]["image"], quarters[3]["image"]], -1)], -2), img)
    assert [q["points"].shape[0] for q in quarters] == [1, 1, 1, 1]
    assert torch.equal(ds[1]["image"], quarters[0]["image"].flip(-1))
    for i in range(8, 18):
        p = ds[i]
        assert p["image"].shape[-2:] == (3, 4)
        # a random patch is a window of the image
        found = any(torch.equal(p["image"].flip(-1) if i % 2 else p["image"], img[:, t:t + 3, l:l + 4])
                    for t in range(4) for l in range(5))
        assert found


def test_tiles_cut_each_image_into_a_batch():
    from crowdkernels.data.targets import CrowdCollate

    img = torch.rand(3, 10, 13)
    pts = torch.tensor([[1.0, 1.0], [12.0, 9.0], [7.5, 2.0]])
    batch = CrowdCollate(tiles=2)([{"image": img, "points": pts, "name": "q", "index": 0}])
    assert batch["images"].shape == (4, 3, 5, 7)
    assert [p.shape[0] for p in batch["points"]] == [1, 1, 0, 1]
    assert torch.equal(batch["images"][0], img[:, :5, :7]) and torch.equal(batch["images"][3, :, :5, :6], img[:, 5:, 7:])
    assert float(batch["density"].sum()) == pytest.approx(3.0, rel=1e-5)


def test_l2sm_paper_fits_the_levels_over_the_training_set(tmp_path):
    cfg = build_config(recipe="l2sm-paper", dataset="synthetic",
                       overrides={"model_kwargs.width": 0.125, "epochs": 1, "workers": 0, "quiet": True,
                                  "synthetic": {"train": 3, "val": 1, "size": 64}})
    cfg.out = str(tmp_path / "run")
    model, criterion, train, val = build_run(cfg)
    assert not bool(model.levels_fitted)
    Trainer(model, criterion, train, val, cfg).run()
    assert bool(model.levels_fitted) and model.num_groups == 5 and model.num_centers == 3 and model.k == 4


def cv2_inter_cubic(src: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's cv2.resize(src, (width, height), interpolation=cv2.INTER_CUBIC) on a float map, restated from
    its arithmetic (imgproc/resize.cpp: interpolateCubic with A = -0.75; fx = (dx + 0.5) * scale_x - 0.5 with
    scale_x = src width / dst width, sx = floor(fx), not clamped for cubic; the 4 taps sx-1..sx+2 clamped to the
    image, i.e. replicated border), in float64 loops, with no torch."""
    A = -0.75

    def coeffs(x):
        c0 = ((A * (x + 1) - 5 * A) * (x + 1) + 8 * A) * (x + 1) - 4 * A
        c1 = ((A + 2) * x - (A + 3)) * x * x + 1
        c2 = ((A + 2) * (1 - x) - (A + 3)) * (1 - x) * (1 - x) + 1
        return (c0, c1, c2, 1.0 - c0 - c1 - c2)

    H, W = src.shape
    out = np.zeros((height, width))
    for dy in range(height):
        fy = (dy + 0.5) * (H / height) - 0.5
        sy = int(np.floor(fy))
        cy = coeffs(fy - sy)
        for dx in range(width):
            fx = (dx + 0.5) * (W / width) - 0.5
            sx = int(np.floor(fx))
            cx = coeffs(fx - sx)
            acc = 0.0
            for i in range(4):
                row = min(max(sy - 1 + i, 0), H - 1)
                for j in range(4):
                    acc += cy[i] * cx[j] * src[row, min(max(sx - 1 + j, 0), W - 1)]
            out[dy, dx] = acc
    return out


def test_csrnet_recipe_uses_sgd_with_momentum_and_the_paper_loss_on_the_released_cubic_target(tmp_path):
    """The paper's 1/(2N) sum ||Z - Z^GT||^2 on the released image.py's target, cv2.resize(target, (w/8, h/8),
    interpolation=cv2.INTER_CUBIC) * 64 (Python 2: w/8 floors), restated above; the prediction's partial last
    row and column (ours pads to 8, the released VGG floors) are left out."""
    cfg = build_config(recipe="csrnet", dataset="synthetic", overrides={"model_kwargs.width": 0.125})
    model, criterion, *_ = build_run(cfg)
    opt = ck.engine.trainer.make_optimizer(model.parameters(), cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.95 and opt.defaults["lr"] == 1e-6
    assert opt.defaults["weight_decay"] == 5e-4
    assert criterion.downsample == "cubic"
    for H, W in ((32, 32), (45, 67)):  # 45 x 67: scale 45/5 = 9 and 67/8 = 8.375, not 8
        out = model(torch.randn(2, 3, H, W))
        assert out.final.shape[-2:] == (-(-H // 8), -(-W // 8))
        g = torch.Generator().manual_seed(H)
        dens = torch.rand(2, 1, H, W, generator=g) * (torch.rand(2, 1, H, W, generator=g) > 0.7)
        h, w = H // 8, W // 8
        gt = torch.from_numpy(np.stack([cv2_inter_cubic(d[0].double().numpy(), w, h) * 64 for d in dens]))[:, None]
        want = ((out.final[..., :h, :w].double() - gt) ** 2).sum() / (2 * 2)  # 1/(2N) sum ||Z - Z^GT||^2
        got = criterion(out, {"density": dens, "points": [torch.zeros(0, 2)] * 2})["total"]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        # "sum" (ours: 8 x 8 cells summed, on the whole ceil grid) is another target
        summed = model.criterion(**{**cfg.criterion_kwargs, "downsample": "sum"})
        other = ((out.final - ck.models._common.density_at(dens, 8, out.final.shape[-2:])) ** 2).sum() / 4
        torch.testing.assert_close(summed(out, {"density": dens, "points": [torch.zeros(0, 2)] * 2})["total"], other)
        assert abs(float(other.detach()) - float(want.detach())) > 1e-3 * float(want.detach())
    with pytest.raises(ValueError, match="downsample must be one of"):
        model.criterion(downsample="area")
    with pytest.raises(ValueError, match="at least 8 x 8 pixels"):
        criterion(model(torch.randn(1, 3, 7, 16)), {"density": torch.rand(1, 1, 7, 16), "points": [torch.zeros(0, 2)]})


def test_validation_schedule():
    from crowdkernels.engine.trainer import validation_due

    released = build_config(recipe="hmode-released", dataset="shanghaitech-a")
    assert [e for e in range(1, 201) if validation_due(e, released)] == list(range(100, 201))  # train.py
    cfg = build_config(model="csrnet", overrides={"epochs": 10, "val_every": 3, "val_start": 2})
    assert [e for e in range(1, 11) if validation_due(e, cfg)] == [3, 6, 9, 10]  # and the last epoch


def test_validation_reports_the_mean_count_baseline(tmp_path):
    cfg = build_config(model="csrnet", dataset="synthetic", overrides={
        "model_kwargs.width": 0.125, "epochs": 1, "workers": 0, "quiet": True, "crop": 32,
        "synthetic": {"train": 4, "val": 3, "size": 32}})
    cfg.out = str(tmp_path / "run")
    model, criterion, train, val = build_run(cfg)
    summary = Trainer(model, criterion, train, val, cfg).run()
    got = summary["history"][0]["val"]
    mean = float(np.mean(train.counts))
    assert got["baseline_count"] == pytest.approx(mean)
    assert got["baseline_mae"] == pytest.approx(float(np.mean([abs(c - mean) for c in val.counts])))


def test_the_training_example_runs_the_recipe(tmp_path, capsys):
    """examples/train_shanghaitech.py: the hmode-paper recipe, then the best checkpoint through the Counter."""
    import runpy

    from conftest import require_data

    root = require_data("ShanghaiTech")
    main = runpy.run_path(str(REPO / "examples" / "train_shanghaitech.py"))["main"]
    summary, metrics = main([str(root), str(tmp_path / "run"), "--epochs", "1", "--width", "0.125", "--workers", "0"])
    assert summary["epoch"] == 1 and metrics["images"] >= 1
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["recipe"] == "hmode-paper" and cfg["crop"] == 256 and cfg["criterion_kwargs"]["rel"] is True


def test_training_progress_is_a_line_per_epoch_in_a_log(tmp_path, capsys):
    """On a terminal the epoch has a progress bar; in a log (stderr not a terminal) no carriage-return frames,
    only the line per epoch."""
    assert cli.main(["train", "--model", "csrnet", "--width", "0.125", "--out", str(tmp_path / "r"), "--workers", "0",
                     "--synthetic", "6", "2", "32", "--epochs", "2", "--crop", "32", "--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert len([line for line in err.splitlines() if line.startswith("epoch ")]) == 2


# ------------------------------------------------------------------------------- issue 22: each cell applied

def test_repeat_reads_each_training_image_times_an_epoch(tmp_path):
    """`repeat`: the released SHHA.py's __getitem__ reads index // AUGMENT (len = images * AUGMENT), CSRNet's
    dataset.py lists root * 4; each read is a new random crop. The recipes' values: AUGMENT = 1, CSRNet's 4."""
    assert [build_config(recipe=r, dataset="shanghaitech-a").repeat for r in recipes.RECIPE_NAMES] == [1, 1, 1, 4]
    root = _folder(tmp_path, n=3, size=(40, 48), heads=4)
    cfg = build_config(model="csrnet", dataset="folder", overrides={"repeat": 4, "crop": 16, "model_kwargs.width": 0.125})
    cfg.root = str(root)
    _, _, train, val = build_run(cfg)
    n = len(train.samples)
    assert n >= 2 and len(train) == 4 * n and len(train.unaugmented()) == n and train.counts == [4] * n
    names = [train[i]["name"] for i in range(4 * n)]
    AUGMENT = 4
    assert names == [train.samples[i // AUGMENT].name for i in range(4 * n)]  # SHHA.py: index // self.data_aug
    torch.manual_seed(0)
    crops = [train[0]["image"] for _ in range(4)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])  # a new random crop each read
    # an epoch is every image 4 times: 4 n steps at batch 1
    cfg.out, cfg.epochs, cfg.batch_size, cfg.workers, cfg.quiet = str(tmp_path / "run"), 1, 1, 0, True
    model, criterion, train, val = build_run(cfg)
    steps = []
    Trainer(model, criterion, train, val, cfg, on_step=lambda t, e, s: steps.append(s)).run()
    assert steps == list(range(1, 4 * n + 1))
    # on the nine patches (csrnet): 18 patches of each image, 4 times
    cfg.patches, cfg.crop = "csrnet9", None
    _, _, train, _ = build_run(cfg)
    assert len(train) == n * 18 * 4
    import pickle

    from crowdkernels.data.patches import Repeated

    again = pickle.loads(pickle.dumps(Repeated(["a", "b"], 3)))  # as a spawned DataLoader worker gets it
    assert [again[i] for i in range(len(again))] == ["a", "a", "a", "b", "b", "b"]
    with pytest.raises(IndexError):
        again[6]
    for bad in (0, 1.5, True):
        cfg.repeat = bad
        with pytest.raises(ValueError, match="repeat must be an int >= 1"):
            build_run(cfg)


def test_weight_init_normal_he_auto(tmp_path):
    """`weight_init`: the layers outside the ImageNet encoder N(0, 0.01) with zero biases (the released HMoDE.py
    and CSRNet model.py _initialize_weights), He, or "auto" (N(0, 0.01) over a --pretrained encoder)."""
    assert {build_config(recipe=r).weight_init for r in recipes.RECIPE_NAMES} == {"auto"}

    def layers(model):
        if name == "hmode":
            return [model.decoder, model.heads, model.gate1, model.gate2, model.attention]
        if name == "csrnet":
            return [model.backend, model.output_layer]
        return [model.scale_conv, model.repredict, model.spn.pyramid, model.spn.regressor]

    for name in ("hmode", "csrnet", "l2sm"):
        for init in ("normal", "he", "auto"):
            cfg = build_config(model=name, overrides={"weight_init": init, "model_kwargs.width": 0.25})
            torch.manual_seed(0)
            model = build_run(cfg)[0]
            convs = [m for seq in layers(model) for m in seq.modules() if isinstance(m, torch.nn.Conv2d)]
            assert convs and all(float(m.bias.detach().abs().max()) == 0 for m in convs)
            big = [m for m in convs if m.weight.numel() >= 2000]
            for m in big:
                std = float(m.weight.std())
                he = (2.0 / (m.weight[0].numel())) ** 0.5
                want = 0.01 if init == "normal" else he  # auto: no --pretrained here, so He
                assert abs(std - want) < 0.15 * want, (name, init, std, want)
    assert ck.HMoDE(width=0.25, init="normal").decoder[0][0].weight.std().item() == pytest.approx(0.01, rel=0.1)
    with pytest.raises(ValueError, match="init must be one of"):
        ck.CSRNet(width=0.125, init="xavier")


def test_hmode_attention_threshold_and_importance_variance_are_options():
    """sec. III-D1: A^g = ground truth > 1e-5 (people per pixel; the released train.py compares its LOG_PARA-scaled
    map with 1e-5 * LOG_PARA); eq. 6's sigma^2 over N - 1 (the released cv_squared's x.var()) or over N."""
    for r in ("hmode-released", "hmode-paper"):
        cfg = build_config(recipe=r, overrides={"model_kwargs.width": 0.25})
        crit = build_run(cfg)[1]
        assert crit.attention_threshold == 1e-5 and crit.importance_unbiased is True
    model = ck.HMoDE(width=0.25)
    model.density_scale = 100.0
    torch.manual_seed(1)
    out = model(torch.randn(2, 3, 32, 32))
    dens = torch.rand(2, 1, 32, 32) * 1e-4
    targets = {"density": dens, "points": [torch.zeros(0, 2)] * 2}
    for t in (1e-5, 5e-5):
        crit = model.criterion(attention_threshold=t, rel=False)
        want = ck.losses.attention_loss(out.attention, dens * 100, threshold=t * 100)
        torch.testing.assert_close(crit(out, targets)["attention"], want)
    a = model.criterion(rel=False)(out, targets)["attention"]
    b = model.criterion(rel=False, attention_threshold=5e-5)(out, targets)["attention"]
    assert abs(float(a.detach()) - float(b.detach())) > 1e-4
    W = out.importance.detach()
    for unbiased in (True, False):
        crit = model.criterion(rel=False, importance_unbiased=unbiased)
        n = W.shape[-1]
        var = W.var(dim=-1, unbiased=True) * ((n - 1) / n if not unbiased else 1.0)
        want = (var / (W.mean(dim=-1) ** 2 + 1e-10)).sum(dim=1).mean()  # eq. 6 per image (the paper variant)
        torch.testing.assert_close(crit(out, targets)["importance"].detach(), want)
    with pytest.raises(ValueError, match="attention_threshold"):
        model.criterion(attention_threshold=-1)
    with pytest.raises(TypeError, match="importance_unbiased"):
        model.criterion(importance_unbiased="yes")


def test_l2sm_centre_rate_initialisation_and_loss_norm_are_options():
    """L2SM eq. 1's alpha, the 'increasing random values' the centres start from (their range), and how sec. 3.4's
    ||.||_2 is read: "squared" (the recipe's) or "l2", the norm as printed (L_D per image, L_r per region, L_c
    per region: |d - d_c|)."""
    cfg = build_config(recipe="l2sm-paper", dataset="synthetic", overrides={"model_kwargs.width": 0.125})
    crit = build_run(cfg)[1]
    assert crit.center_loss.alpha == 0.5 and crit.norm == "squared" and crit.center_loss.norm == "squared"
    model = ck.L2SM(width=0.125)
    wide = model.criterion(center_init_max=50.0, alpha=0.25, generator=torch.Generator().manual_seed(0))
    c = wide.center_loss.centers
    assert wide.center_loss.alpha == 0.25 and bool((c[1:] > c[:-1]).all()) and 0 <= float(c[0]) and float(c[-1]) < 50
    assert float(c[-1]) > 1.0  # drawn from [0, 50), not [0, 1)

    torch.manual_seed(0)
    pts = [torch.rand(40, 2) * 63, torch.rand(25, 2) * 63]
    dens = ck.density_maps(pts, (64, 64), sigma=2.0)
    targets = {"density": dens, "points": pts}
    out = model(torch.randn(2, 3, 64, 64))
    assert out.boxes.shape[0] > 0
    sq = model.criterion(sigma=2.0, generator=torch.Generator().manual_seed(1))
    l2 = model.criterion(sigma=2.0, generator=torch.Generator().manual_seed(1), norm="l2")
    centers = sq.center_loss.centers.clone()
    a, b = sq(out, targets), l2(out, targets)
    gt = ck.models._common.density_at(dens, 4, out.initial.shape[-2:])
    diff = (out.initial - gt).flatten(1)
    torch.testing.assert_close(a["density"], (diff ** 2).sum() / 2)
    torch.testing.assert_close(b["density"], diff.norm(dim=1).sum() / 2)        # ||D - D-hat||_2 per image
    target, valid = sq.region_targets(out, targets)
    per_region = ((out.repredictions - target)[:, 0] * valid).flatten(1)
    torch.testing.assert_close(a["reprediction"], (per_region ** 2).sum() / 2)
    torch.testing.assert_close(b["reprediction"], per_region.norm(dim=1).sum() / 2)
    sel = out.center_index >= 0
    d = out.region_means[sel] / out.scale.flatten(1)[sel] ** 2 - centers[out.center_index[sel]]
    torch.testing.assert_close(a["center"], (d ** 2).sum() / 2)
    torch.testing.assert_close(b["center"], d.abs().sum() / 2)
    b["total"].backward()  # finite gradients, also where a difference is 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="norm must be one of"):
        model.criterion(norm="l1")


def test_ucf_cc_50_is_run_per_fold():
    """HMoDE sec. IV-A / L2SM sec. 4.1: UCF_CC_50 by 5-fold cross-validation, a run per fold: the recipes name fold 1
    there and --fold picks the others."""
    for r in recipes.RECIPE_NAMES:
        assert build_config(recipe=r, dataset="ucf-cc-50").fold == 1
        assert build_config(recipe=r, dataset="ucf-cc-50", overrides={"fold": 3}).fold == 3
        assert build_config(recipe=r, dataset="shanghaitech-a").fold is None

