"""No file crowdkernels opens can run code (issue 19): every .pt/.pth is read with torch.load(weights_only=True).

A payload (a pickle whose __reduce__ calls os.system to create a marker file) is planted in each kind of file
crowdkernels reads (our checkpoint, the authors' released HMoDE files in their three layouts, a torchvision
state_dict, a whole pickled nn.Module) and passed through every entry point, in the library and on the command
line: the marker never appears, and the error is one line (CLI: exit 2, no traceback). Legitimate files of every
kind still load, the NumPy types the released and the 0.1.0 files hold among them, and a run of crowdkernels
0.1.0 (python_tests/data/release-0.1.0, written by make_release_checkpoints.py) resumes exactly."""
from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import crowdkernels as ck
from conftest import CHILD_CWD, REPO, child_env
from crowdkernels import cli
from crowdkernels.engine.checkpoint import CHECKPOINT_FORMAT, CheckpointError
from released_hmode import released_key_names

RELEASE_0_1_0 = REPO / "python_tests" / "data" / "release-0.1.0"
SYN = ["--synthetic", "4", "2", "32", "--workers", "0", "--device", "cpu"]


class Payload:
    """Unpickling it runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _released_sd(payload=None) -> dict:
    """A released HMoDE state_dict by its key names (tiny tensors: the names are what identifies the layout)."""
    sd = {k: torch.zeros(1) for k in released_key_names()}
    if payload is not None:
        sd["mask.output.conv.bias"] = payload
    return sd


def _torchvision_sd() -> dict:
    net = ck.VGG16()
    sd = {"features." + k: v for k, v in net.features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(8, 4)
    return sd


class WholeModel(torch.nn.Module):
    """What `torch.save(model)` pickles: the class, its submodules, and here a payload among its attributes."""

    def __init__(self, payload=None):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
        self.payload = payload


def _planted(kind: str, marker) -> object:
    """A file of ``kind`` with the payload inside, where such a file holds data of its own."""
    p = Payload(marker)
    if kind == "ours":
        net = ck.CSRNet(width=0.125)
        return {"format": CHECKPOINT_FORMAT, "model_name": "csrnet", "config": {"model": "csrnet", "model_kwargs":
                {"width": 0.125}}, "model": net.state_dict(), "epoch": 1, "step": 0, "best": {}, "history": [],
                "rng": {"torch": torch.get_rng_state(), "numpy": p, "python": (3, (0,) * 625, None)}}
    if kind == "released-plain":
        return _released_sd(p)
    if kind == "released-model":
        return {"model": _released_sd(p)}
    if kind == "released-training":  # their train.py: {'epoch', 'i_tb', 'model', 'optimizer', 'record'}
        return {"epoch": 99, "i_tb": 4, "model": {"module." + k: v for k, v in _released_sd().items()},
                "optimizer": {}, "record": {"best_mae": p, "mse": np.float64(80.5), "corr_loss": 0, "corr_epoch": 3,
                                            "best_model_name": ""}}
    if kind == "torchvision":
        sd = _torchvision_sd()
        sd["classifier.0.bias"] = p
        return sd
    if kind == "module":
        return WholeModel(p)
    raise AssertionError(kind)


KINDS = ["ours", "released-plain", "released-model", "released-training", "torchvision", "module"]


def _image(tmp_path):
    path = tmp_path / "crowd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


def _api(call):
    def run(path, tmp_path, capsys):
        with pytest.raises(CheckpointError) as err:
            call(path)
        assert isinstance(err.value, ValueError)
        return str(err.value)
    return run


def _cli(argv):
    def run(path, tmp_path, capsys):
        code = cli.main(argv(str(path), tmp_path))
        captured = capsys.readouterr()
        assert code == 2, captured
        assert "Traceback" not in captured.err
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err
        return lines[0]
    return run


def _resume_argv(path, tmp_path):
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    shutil.copy(path, out / "last.pt")
    return ["train", "--out", str(out), "--resume", "--device", "cpu"]


ENTRY_POINTS = {
    "ck.load": _api(lambda p: ck.load(p, device="cpu")),
    "model_from_checkpoint": _api(lambda p: ck.engine.checkpoint.model_from_checkpoint(p)),
    "load_initial_weights": _api(lambda p: ck.engine.checkpoint.load_initial_weights(ck.CSRNet(width=0.125), p)),
    "VGG16(pretrained=)": _api(lambda p: ck.VGG16(pretrained=p)),
    "HMoDE.from_official": _api(lambda p: ck.HMoDE.from_official(p)),
    "count --checkpoint": _cli(lambda p, t: ["count", _image(t), "--checkpoint", p, "--device", "cpu"]),
    "eval --checkpoint": _cli(lambda p, t: ["eval", "--checkpoint", p, "--dataset", "synthetic", "--workers", "0",
                                            "--device", "cpu"]),
    "train --init": _cli(lambda p, t: ["train", "--model", "csrnet", "--width", "0.125", "--init", p, "--out",
                                       str(t / "run"), "--epochs", "1", *SYN]),
    "train --resume": _cli(_resume_argv),
    "train --pretrained": _cli(lambda p, t: ["train", "--model", "csrnet", "--pretrained", p, "--out", str(t / "run"),
                                             "--epochs", "1", *SYN]),
}


def _marker_checked_first(marker, what: str, call):
    """call()'s result; whatever else fails, a marker that the payload made fails first."""
    try:
        return call()
    except BaseException:
        assert not marker.exists(), what
        raise
    finally:
        assert not marker.exists(), what


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_payload_never_runs(kind, entry, tmp_path, capsys):
    marker = tmp_path / "marker"
    path = tmp_path / f"{kind}.pth"
    torch.save(_planted(kind, marker), path)
    message = _marker_checked_first(marker, f"the payload in a {kind} file ran through {entry}",
                                    lambda: ENTRY_POINTS[entry](path, tmp_path, capsys))
    assert "\n" not in message and ("last.pt" if entry == "train --resume" else path.name) in message
    if kind == "module":  # the type it met, and how to make a state_dict of it
        assert "WholeModel" in message and "nn.Module" in message and ".state_dict()" in message, message
    else:
        assert "posix.system" in message and "weights_only=True" in message, message
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing started


def test_the_cli_refuses_in_one_line_in_a_real_process(tmp_path):
    """The command as a user runs it: exit 2, one line on stderr (no traceback, no warning), no marker."""
    marker = tmp_path / "marker"
    for kind, argv in [("ours", ["count", _image(tmp_path), "--checkpoint"]),
                       ("module", ["train", "--model", "csrnet", "--out", str(tmp_path / "run"), *SYN,
                                   "--pretrained"])]:
        path = tmp_path / f"{kind}.pth"
        torch.save(_planted(kind, marker), path)
        proc = subprocess.run([sys.executable, "-m", "crowdkernels", *argv, str(path)], cwd=CHILD_CWD,
                              env=child_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert str(path) in proc.stderr
        assert not marker.exists()


class _no_warnings:
    """No warning escapes (the CLI would print it as a second line)."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not self.records, [str(w.message) for w in self.records]


class ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("how", ["exec", "legacy-format", "protocol-4", "numpy-object-array", "torchscript"])
def test_other_payloads_are_refused_naming_what_they_hold(how, tmp_path):
    """Other ways to carry code, and a TorchScript archive (which weights_only refuses): one line, no warning."""
    marker = tmp_path / "marker"
    path = tmp_path / "w.pth"
    if how == "exec":
        torch.save({"w": torch.zeros(1), "p": ExecPayload(marker)}, path)
    elif how == "legacy-format":
        torch.save({"p": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif how == "protocol-4":
        torch.save({"p": Payload(marker)}, path, pickle_protocol=4)
    elif how == "numpy-object-array":  # the NumPy allowlist takes uint32 arrays, float scalars: not object arrays
        torch.save({"p": np.array([1, Payload(marker)], dtype=object)}, path)
    else:
        with warnings.catch_warnings():  # torch.jit.script is deprecated, its archives are still about
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(torch.nn.Conv2d(1, 1, 1)).save(str(path))

    def load():
        with _no_warnings(), pytest.raises(CheckpointError) as err:
            ck.engine.checkpoint.model_from_checkpoint(path)
        return str(err.value)

    message = _marker_checked_first(marker, f"the {how} payload ran", load)
    assert "\n" not in message and str(path) in message
    expected = {"exec": "builtins.exec", "legacy-format": "posix.system", "protocol-4": "Unsupported operand",
                "numpy-object-array": "numpy.dtypes.ObjectDType", "torchscript": "TorchScript archive"}[how]
    assert expected in message, message


# ------------------------------------------------------------------------------------------ legitimate files
def _numpy1_pickle_module():
    """A pickle module for torch.save that writes NumPy's array and scalar constructors under NumPy 1's names
    (numpy.core.multiarray), as files written under NumPy 1 (the released train.py's torch 1.10 needs it) name
    them; NumPy 2 writes numpy._core.multiarray."""
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray

    class Pickler(pickle._Pickler):
        def save_global(self, obj, name=None):
            for f in (multiarray.scalar, multiarray._reconstruct):
                if obj is f:
                    self.write(pickle.GLOBAL + f"numpy.core.multiarray\n{f.__name__}\n".encode())
                    self.memoize(obj)
                    return
            super().save_global(obj, name)

    return types.SimpleNamespace(Pickler=Pickler, __name__="numpy1_pickle")


@pytest.mark.parametrize("numpy_names", ["numpy 2", "numpy 1"])
def test_released_files_load_with_their_numpy_record(numpy_names, tmp_path):
    """The three released layouts load; the training checkpoint's record (NumPy float64 scalars, as their
    train.py computes best_mae / mse / corr_loss under NumPy 1) comes back as written."""
    from crowdkernels._safe_load import load_torch_file
    from crowdkernels.engine.checkpoint import read_weights_file

    kw = {"pickle_module": _numpy1_pickle_module()} if numpy_names == "numpy 1" else {}
    sd = _released_sd()
    record = {"best_mae": np.float64(60.5), "mse": np.float64(98.25), "corr_loss": np.float64(0.125),
              "corr_epoch": 180, "best_model_name": ""}
    files = {"plain": sd, "model": {"model": sd},
             "training": {"epoch": 199, "i_tb": 12, "model": {"module." + k: v for k, v in sd.items()},
                          "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
                          "record": record}}
    for layout, obj in files.items():
        path = tmp_path / f"{layout}.pth"
        torch.save(obj, path, **kw)
        if numpy_names == "numpy 1" and layout == "training":
            assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
        kind, state = read_weights_file(path)
        assert kind == "released" and set(state) <= {k for k in sd} | {"module." + k for k in sd}
        assert len(state) == len(sd)
    got = load_torch_file(tmp_path / "training.pth")["record"]
    assert got == record and type(got["best_mae"]) is np.float64


def test_a_whole_pickled_model_is_refused_and_the_readme_converts_it(tmp_path, monkeypatch):
    """--pretrained with a pickled nn.Module: one line saying how to make a state_dict; the README's snippet
    does it, and the state_dict it writes loads. In the API an nn.Module object is still taken as it is."""
    src = ck.VGG16()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    torch.save(src, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match=r"old\.pth holds a whole pickled model .*VGG16, an nn\.Module.*"
                                              r"state_dict\(\)"):
        ck.VGG16(pretrained=tmp_path / "old.pth")
    readme = (REPO / "README.md").read_text()
    (snippet,) = re.findall(r"^```py\n(.*?)^```", readme, flags=re.S | re.M)
    assert "weights_only=False" in snippet and len(snippet.strip().splitlines()) == 3
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md conversion snippet", "exec"), {})
    for pretrained in (tmp_path / "new.pth", src):
        m = ck.VGG16(pretrained=pretrained)
        for k, v in m.features.state_dict().items():
            assert torch.equal(v, src.features.state_dict()[k]), k


def test_rng_states_are_tensors_and_plain_data(tmp_path):
    """What rng_state() gives loads with a plain torch.load(weights_only=True), no allowlist, and puts every
    RNG back exactly; the NumPy tuple of 0.1.0's checkpoints (its key a uint32 array) is put back too."""
    import random

    from crowdkernels.engine.checkpoint import rng_state, set_rng_state

    def draws():
        return (random.random(), float(np.random.standard_normal()), np.random.randint(0, 2**31, 4).tolist(),
                torch.rand(3).tolist())

    allowed_before = list(torch.serialization.get_safe_globals())
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = draws()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == want
    legacy = dict(rng_state(), numpy=np.random.get_state())  # 0.1.0 wrote NumPy's tuple
    want = draws()
    for kw in ({}, {"pickle_module": _numpy1_pickle_module()}):
        torch.save(legacy, tmp_path / "legacy.pt", **kw)
        from crowdkernels._safe_load import load_torch_file

        set_rng_state(load_torch_file(tmp_path / "legacy.pt"))
        assert draws() == want
    assert torch.serialization.get_safe_globals() == allowed_before  # the NumPy allowlist was for the loads only


def test_a_checkpoint_of_release_0_1_0_loads_and_resumes_exactly(tmp_path):
    """interrupted.pt: crowdkernels 0.1.0 stopped by Ctrl-C at epoch 2, step 1 (its RNG states hold NumPy
    arrays); finished.pt: the same run, uninterrupted, by 0.1.0. Resumed by today's `train --resume`, the run
    ends where 0.1.0's uninterrupted run ended, and its new checkpoints need no allowlist."""
    from crowdkernels.engine.checkpoint import load_checkpoint

    interrupted = load_checkpoint(RELEASE_0_1_0 / "interrupted.pt")
    finished = load_checkpoint(RELEASE_0_1_0 / "finished.pt")
    assert (interrupted["epoch"], interrupted["step"]) == (1, 1) and isinstance(interrupted["rng"]["numpy"], tuple)
    counter = ck.load(RELEASE_0_1_0 / "finished.pt", device="cpu")
    assert np.isfinite(counter.count(_image(tmp_path)))

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(RELEASE_0_1_0 / "interrupted.pt", run / "last.pt")
    assert cli.main(["train", "--out", str(run), "--resume", "--device", "cpu"]) == 0
    resumed = load_checkpoint(run / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (2, 0)
    # the same arithmetic on the same inputs: equal on the machine that wrote the files; the tolerance is for
    # another CPU's kernels (a wrong RNG state, i.e. other crops, flips or order, moves weights by ~1e-3)
    for k, v in finished["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for got, want in zip(resumed["history"], finished["history"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert resumed["best"]["epoch"] == finished["best"]["epoch"]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(run / "last.pt") == []


def test_an_eps_file_is_never_rendered(tmp_path, monkeypatch):
    """Pillow renders EPS (whatever the suffix) by running Ghostscript: images are read as raster data only."""
    from PIL import EpsImagePlugin

    from crowdkernels.data.readers import ImageError, image_size, load_image

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a) or (_ for _ in ()).throw(OSError("gs")))
    eps = tmp_path / "crowd.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    for read in (load_image, image_size):
        with pytest.raises(ImageError, match="crowd.jpg"):
            read(eps)
    assert ran == []
