"""Export to ONNX (and .pt2) and counting with ONNX Runtime: for every model that exports and for the authors'
released HMoDE files, the ONNX counter's counts equal the PyTorch Counter's to 1e-4 relative and its maps to
1e-5 of their maximum, at sizes that are and are not multiples of the stride and on a real image at full
resolution; the file passes onnx.checker and carries its metadata; the CLI exports and counts with it."""
from __future__ import annotations

import json
import sys

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install 'crowdkernels[deploy]'")
pytest.importorskip("onnxscript", reason="onnxscript is not installed: pip install 'crowdkernels[deploy]'")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'crowdkernels[deploy]'")

import crowdkernels as ck  # noqa: E402
from crowdkernels import cli  # noqa: E402
from crowdkernels.engine.export import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export  # noqa: E402
from crowdkernels.models import HMoDE  # noqa: E402
from conftest import require_data  # noqa: E402
from released_hmode import released_state_dict  # noqa: E402
from test_inference import WIDTH, _checkpoint, _crowd_png  # noqa: E402

COUNT_RTOL = 1e-4
MAP_TOL = 1e-5  # of the map's largest absolute value
#: one size a multiple of every stride and of the padding multiple, one that is not
SIZES = [(64, 96), (61, 77)]
EXPORTED = ["csrnet", "spn", "l2sm", "hmode", "hmode-official", "released"]


def _released_file(path):
    """An HMoDE file in the authors' released format (their names, a plain state_dict; full width, as released),
    of random weights."""
    torch.manual_seed(0)
    torch.save(released_state_dict(HMoDE(variant="official")), path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """model -> (its checkpoint, its ONNX file), each exported once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            ckpt = _released_file(root / "released.pth") if name == "released" else _checkpoint(root / "best.pt", name)
            cache[name] = (ckpt, export(ckpt, root / "model.onnx"))
        return cache[name]

    return get


def _real_image():
    folder = require_data("ShanghaiTech", "part_B", "train_data", "images")
    images = sorted(folder.glob("*.jpg"))
    if not images:
        pytest.skip(f"no ShanghaiTech B image in {folder}")
    return images[0]


def _assert_same(torch_counter, onnx_counter, image):
    a, b = torch_counter.predict(image), onnx_counter.predict(image)
    assert b.cells.shape == a.cells.shape
    assert b.count == pytest.approx(a.count, rel=COUNT_RTOL, abs=1e-6)
    da, db = a.density(), b.density()
    assert float((da - db).abs().max()) <= MAP_TOL * float(da.abs().max())


@pytest.mark.parametrize("name", EXPORTED)
def test_onnx_counts_equal_pytorch(name, exported, tmp_path):
    ckpt, path = exported(name)
    torch_counter, onnx_counter = ck.load(ckpt, "cpu"), ck.load(path)
    for k, (h, w) in enumerate(SIZES):
        _assert_same(torch_counter, onnx_counter, _crowd_png(tmp_path / f"{k}.png", h, w, seed=k))
    images = [_crowd_png(tmp_path / f"b{k}.png", 61, 77, seed=k) for k in range(2)]
    assert onnx_counter.count_many(images, batch_size=2) == pytest.approx(torch_counter.count_many(images, batch_size=2),
                                                                          rel=COUNT_RTOL)


# the released files are full width: on a small image above; the graph is hmode-official's
@pytest.mark.parametrize("name", [n for n in EXPORTED if n != "released"])
def test_onnx_counts_a_real_image_at_full_resolution(name, exported):
    image = _real_image()
    ckpt, path = exported(name)
    _assert_same(ck.load(ckpt, "cpu"), ck.load(path), image)


def test_the_file_passes_the_checker_and_says_what_it_is(exported):
    ckpt, path = exported("hmode")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    assert any(o.domain in ("", "ai.onnx") and o.version == ONNX_OPSET for o in model.opset_import)
    assert not any(n.domain.startswith("crowdkernels") for n in model.graph.node)
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["model"] == "hmode" and meta["stride"] == 4 and meta["input_multiple"] == 16
    assert meta["crowdkernels_version"] == ck.__version__
    assert {"max_size", "tile"} <= set(meta)


# one plain network, the region selection, the gating; sizes with and without a crop of the padded map
@pytest.mark.parametrize("name", ["csrnet", "l2sm", "hmode"])
def test_pt2_runs_the_same_graph(name, exported, tmp_path):
    """A .pt2 program checks at run time the guards recorded while tracing: it runs at sizes and batch sizes
    other than the example's (2 x 256 x 320, a multiple of every stride) only if none of them depends on it."""
    ckpt, _ = exported(name)
    path = export(ckpt, tmp_path / "model.pt2", format="pt2")
    program = torch.export.load(str(path))
    counter = ck.load(ckpt, "cpu")
    for batch, size in ((1, (61, 77)), (1, (50, 50)), (2, (33, 129))):
        rgb = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        expected = counter.predict_cells(rgb)
        got = program.module()(rgb)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= MAP_TOL * float(expected.abs().max())


def test_l2sm_exports_with_its_fitted_levels(tmp_path):
    """An L2SM whose density levels were fitted (sec. 4.2, as the l2sm-paper recipe trains) selects by them
    in the exported graph too. The levels are fitted on the tested images' own regions, so each image has
    regions above and below them, and the graph's per-region choice between re-prediction and initial
    density is exercised both ways."""
    from crowdkernels.data.readers import load_image
    from crowdkernels.data.transforms import normalize_image
    from crowdkernels.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = _checkpoint(tmp_path / "best.pt", "l2sm")
    model = ck.load(ckpt, "cpu").model
    images = [_crowd_png(tmp_path / f"{k}.png", 61 + 16 * k, 77, seed=k) for k in range(3)]
    inputs = [normalize_image(load_image(p)[None], model.input_norm) for p in images]
    with torch.no_grad():
        model.fit_levels(torch.cat([model(x).region_means for x in inputs]))
        for x in inputs:
            selected = model(x).center_index >= 0
            assert bool(selected.any()) and not bool(selected.all())
    state = load_checkpoint(ckpt)
    state["model"] = model.state_dict()
    save_checkpoint(ckpt, state)
    torch_counter, onnx_counter = ck.load(ckpt, "cpu"), ck.load(export(ckpt, tmp_path / "model.onnx"))
    assert bool(torch_counter.model.levels_fitted)
    for image in images:
        _assert_same(torch_counter, onnx_counter, image)


def test_without_the_deploy_extra_export_and_load_say_what_to_install(exported, monkeypatch, tmp_path, capsys):
    ckpt, path = exported("csrnet")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"^onnxruntime not installed: pip install 'crowdkernels\[deploy\]'"):
        ck.load(path)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"^onnx not installed: pip install 'crowdkernels\[deploy\]'"):
        export(ckpt, tmp_path / "model.onnx")
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "crowdkernels export: error: onnx not installed: pip install 'crowdkernels[deploy]' "
        "(or: pip install onnx onnxscript onnxruntime)"]


def test_cli_exports_and_counts_with_the_file(exported, tmp_path, capsys):
    ckpt, _ = exported("csrnet")
    out = tmp_path / "cli.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    image = _crowd_png(tmp_path / "a.png", 61, 77)
    capsys.readouterr()
    assert cli.main(["count", "--checkpoint", str(out), "--json", str(image)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["count"] == pytest.approx(ck.load(ckpt, "cpu").count(image), rel=COUNT_RTOL)
    assert cli.main(["count", "--checkpoint", str(out), "--tile", "512", str(image)]) == 2


def test_onnx_counter_evaluates_a_dataset_as_pytorch(exported):
    from crowdkernels.data import SyntheticCrowds

    ckpt, path = exported("hmode")
    ours, _ = ck.load(path).evaluate(SyntheticCrowds(3, 72, 0), progress=False)
    theirs, _ = ck.load(ckpt, "cpu").evaluate(SyntheticCrowds(3, 72, 0), progress=False)
    assert ours["images"] == theirs["images"] == 3
    assert ours["mae"] == pytest.approx(theirs["mae"], rel=COUNT_RTOL, abs=1e-5)
