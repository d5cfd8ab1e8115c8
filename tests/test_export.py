"""kd.export: each format read back and compared with torch at batch 1 and > 1 (a CIFAR ResNet and a ViT), the
metadata read back, the README's onnxruntime example run on a real JPEG, and the bad inputs' error lines."""
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import REPO, script_env
from kd import export
from kd.checkpoint import load_model_file, save_model_file
from kd.data import eval_transform
from kd.errors import UserError
from kd.models import build_model

onnxruntime = pytest.importorskip("onnxruntime")
CLASSES = ["cat", "dog", "fox"]
TOL = 1e-4  # the same bound as kd.export.TOLERANCE, on logits of scale ~1


def model_meta(arch, image_size=32, dataset="imagefolder"):
    return {"arch": arch, "head": "linear", "num_classes": 3, "class_names": CLASSES, "image_size": image_size,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "dataset": dataset, "job_type": "distill",
            "epoch": 2, "val_acc1": 0.5}


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet8", 3)
    with torch.no_grad():  # BN statistics away from identity, so a wrong eval-mode export shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("model") / "model_best.pt"
    save_model_file(path, model.state_dict(), {**model_meta("resnet8"), "model": model.kd_spec})
    return path


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A kd model file of torchvision's VisionTransformer, built by a user factory (tests/model_factories.py)."""
    torch.manual_seed(0)
    vit = build_model("model_factories:tiny_vit", 3, image_size=32)
    torch.nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision zero-initializes the head
    path = tmp_path_factory.mktemp("vit") / "model_best.pt"
    save_model_file(path, vit.state_dict(), {**model_meta("model_factories:tiny_vit"), "model": vit.kd_spec})
    return path


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 32, 32, generator=g) for n in (1, 5)]


def assert_same_outputs(reference, run):
    for x in batches():
        with torch.no_grad():
            expected, got = reference(x), torch.as_tensor(np.asarray(run(x)))
        assert got.shape == expected.shape and (got - expected).abs().max() < TOL


def onnx_runner(path):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, lambda x: session.run(["logits"], {"images": x.numpy()})[0]


@pytest.fixture(scope="module")
def cnn_onnx(cnn_file):
    """(the exported file, what `python -m kd.export` printed)"""
    out, printed = cnn_file.parent / "student.onnx", io.StringIO()
    with contextlib.redirect_stdout(printed):
        export.main([str(cnn_file), "--format", "onnx", "--out", str(out)])
    return out, printed.getvalue()


def test_onnx_round_trip_and_metadata(cnn_file, cnn_onnx):
    path, printed = cnn_onnx
    diff = float(re.search(r"max \|diff\| (\d\.\d\de[-+]\d\d)", printed).group(1))
    assert diff < TOL and "checked against torch on batches of 1 and 3" in printed
    session, run = onnx_runner(path)
    (images,) = session.get_inputs()
    assert not isinstance(images.shape[0], int) and images.shape[1:] == [3, 32, 32]  # the batch dim is dynamic
    assert_same_outputs(load_model_file(cnn_file)[0], run)
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["class_names"] == CLASSES and meta["image_size"] == 32 and meta["resize"] == 37
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["arch"] == "resnet8" and meta["format"] == export.EXPORT_FORMAT


def test_torchscript_round_trip_and_metadata(cnn_file, tmp_path):
    export.main([str(cnn_file.parent), "--format", "torchscript", "--out", str(tmp_path / "m.ts")])  # a run dir
    extra = {export.TORCHSCRIPT_META: ""}
    loaded = torch.jit.load(str(tmp_path / "m.ts"), _extra_files=extra)
    assert_same_outputs(load_model_file(cnn_file)[0], lambda x: loaded(x).detach())
    assert json.loads(extra[export.TORCHSCRIPT_META])["class_names"] == CLASSES


def test_safetensors_round_trip_and_metadata(cnn_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "m.safetensors"
    export.main([str(cnn_file), "--format", "safetensors", "--out", str(out)])
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["class_names"] == CLASSES and meta["arch"] == "resnet8" and meta["num_classes"] == 3
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["kd"]) == meta
    rebuilt = build_model(meta["arch"], meta["num_classes"], spec=meta["model"]).eval()  # from the JSON alone
    rebuilt.load_state_dict(load_file(str(out)))
    assert_same_outputs(load_model_file(cnn_file)[0], rebuilt)


def test_vit_round_trip_every_format(vit_file, tmp_path):
    vit = load_model_file(vit_file)[0]
    assert isinstance(vit, torchvision.models.VisionTransformer)
    for fmt, name in (("onnx", "vit.onnx"), ("torchscript", "vit.ts"), ("safetensors", "vit.safetensors")):
        assert export.export(vit_file, fmt, tmp_path / name)["max_abs_diff"] < TOL
    assert_same_outputs(vit, onnx_runner(tmp_path / "vit.onnx")[1])
    loaded = torch.jit.load(str(tmp_path / "vit.ts"))
    assert_same_outputs(vit, lambda x: loaded(x).detach())
    meta = json.loads((tmp_path / "vit.json").read_text())
    rebuilt = build_model(meta["arch"], meta["num_classes"], spec=meta["model"]).eval()  # from the JSON alone
    from safetensors.torch import load_model
    load_model(rebuilt, str(tmp_path / "vit.safetensors"))
    assert_same_outputs(vit, rebuilt)


def readme_inference_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Ship the student", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_inference_example_matches_the_kd_model(cnn_file, cnn_onnx, tmp_path, monkeypatch):
    """The README's block, run as written on a JPEG, gives the kd model's logits: the stored preprocessing is kd's
    own eval transform."""
    shutil.copy(cnn_onnx[0], tmp_path / "student.onnx")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), np.uint8)).save(tmp_path / "dog.jpg", quality=90)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(readme_inference_example(), namespace)
    model, meta = load_model_file(cnn_file)
    x = eval_transform(meta["dataset"], meta["image_size"], meta["mean"], meta["std"])(
        Image.open(tmp_path / "dog.jpg").convert("RGB"))
    with torch.no_grad():
        expected = model(x[None])
    assert np.abs(namespace["logits"] - expected.numpy()).max() < TOL


def test_not_a_kd_model_is_one_line_from_the_command(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    proc = subprocess.run([sys.executable, "-m", "kd.export", str(tmp_path / "other.pt"), "--format", "onnx",
                           "--out", str(tmp_path / "a.onnx")], cwd=REPO, env=script_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "is not a kd model file" in proc.stderr and not (tmp_path / "a.onnx").exists()


def test_bad_inputs_are_one_line(cnn_file, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    cases = {(tmp_path / "notes.txt", tmp_path / "a.ts"): "not a kd model file",
             (tmp_path / "missing.pt", tmp_path / "a.ts"): "does not exist",
             (cnn_file, tmp_path / "notes.txt" / "a.ts"): "cannot be written",
             (cnn_file, tmp_path): "is a folder", (cnn_file, cnn_file): "is the model file itself"}
    for (model, out), message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            export.main([str(model), "--format", "torchscript", "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert (tmp_path / "notes.txt").read_text() == "not a model"  # nothing already there is lost
    assert load_model_file(cnn_file)[1]["arch"] == "resnet8"


def test_unexportable_operator_is_named(tmp_path):
    model = build_model("model_factories:eigen_net", 3)
    path = tmp_path / "model_best.pt"
    save_model_file(path, model.state_dict(), {**model_meta("model_factories:eigen_net"), "model": model.kd_spec})
    with pytest.raises(UserError, match=r"aten\.linalg_eig has no ONNX translation"):
        export.export(path, "onnx", tmp_path / "e.onnx")
    assert not (tmp_path / "e.onnx").exists() and not list(tmp_path.glob(".*"))  # no half-written file
    assert export.export(path, "torchscript", tmp_path / "e.ts")["max_abs_diff"] < TOL  # the other formats work


def test_missing_extra_names_it(cnn_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(UserError, match=r"onnxruntime: pip install -e '\.\[export\]'"):
        export.export(cnn_file, "onnx", tmp_path / "m.onnx")
