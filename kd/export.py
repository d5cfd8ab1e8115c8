"""Ship a trained model: export a kd model file (or a run dir) to ONNX, TorchScript or safetensors.

    python -m kd.export runs/distill --format onnx --out student.onnx
    python -m kd.export runs/distill/model_best.pt --format torchscript --out student.ts
    python -m kd.export runs/distill --format safetensors --out student.safetensors   # + student.json beside it

Every export is read back and run on a batch of 1 and a batch of 3 (ONNX in onnxruntime, TorchScript with
torch.jit.load, safetensors loaded into the model) and compared with the kd model: the max |diff| is printed, and
one above TOLERANCE x the logits' scale is an error. The metadata (class names, image size, preprocessing, arch)
travels with the file: ONNX metadata_props, TorchScript extra file `kd.json`, a JSON beside the safetensors file.
ONNX uses torch's own exporter (torch.export + onnxscript, the default since torch 2.9), with a dynamic batch
dimension. Needs the optional extra: pip install -e '.[export]'.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from kd.checkpoint import load_model_file, resolve_model_path
from kd.data import eval_resize
from kd.errors import UserError, user_errors

FORMATS = ("onnx", "torchscript", "safetensors")
EXPORT_FORMAT = "kd-export/1"
TOLERANCE = 1e-4  # max |exported - torch| over max(1, max |torch logit|): float32 reassociation, not a bug
CHECK_BATCHES = (1, 3)
OPSET = 18
INPUT, OUTPUT = "images", "logits"
TORCHSCRIPT_META = "kd.json"


def export_metadata(meta: dict) -> dict:
    """What a user of the exported file needs: the classes and the exact eval preprocessing."""
    size = meta["image_size"]
    return {
        "format": EXPORT_FORMAT, "arch": meta["arch"], "num_classes": meta["num_classes"],
        "class_names": meta.get("class_names"), "image_size": size,
        "resize": eval_resize(meta.get("dataset", ""), size),  # shorter side, bilinear, then center-crop image_size
        "mean": meta["mean"], "std": meta["std"],
        "input": f"{INPUT}: float32 N x 3 x {size} x {size}, RGB scaled to [0, 1], then (x - mean) / std",
        "output": f"{OUTPUT}: float32 N x {meta['num_classes']}, unnormalized class scores",
        "job_type": meta.get("job_type"), "dataset": meta.get("dataset"), "val_acc1": meta.get("val_acc1"),
        "epoch": meta.get("epoch"), "head": meta.get("head"),
        "model": meta.get("model"),  # the recorded constructor (family, name, kwargs), when the model file has one
    }


def _check_inputs(image_size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, image_size, image_size, generator=g) for n in CHECK_BATCHES]


def _compare(model: nn.Module, run, image_size: int) -> float:
    """Max |diff| between `run(x)` and the model over the check batches; a UserError past the tolerance."""
    worst = 0.0
    for x in _check_inputs(image_size):
        with torch.no_grad():
            ref = model(x)
        got = torch.as_tensor(run(x))
        if got.shape != ref.shape:
            raise UserError(f"the exported model returns shape {tuple(got.shape)} for a batch of {len(x)}, the kd "
                            f"model {tuple(ref.shape)}: the export is wrong; report it with the model's arch")
        diff = (got.float() - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        if not diff <= TOLERANCE * scale:
            raise UserError(f"the exported model differs from the kd model by {diff:.3g} (batch {len(x)}), more "
                            f"than {TOLERANCE:g} x {scale:.3g}: the export is wrong; report it with the model's arch")
        worst = max(worst, diff)
    return worst


def _needs(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"this export needs the optional package {name}: pip install -e '.[export]' (or pip "
                            f"install {' '.join(modules)})") from None


def _failed_op(exc: BaseException) -> str:
    """The operator an exporter failure names (e.g. aten.linalg_eig), searched through the exception chain."""
    text, seen = "", exc
    while seen is not None:
        text += f"\n{seen}"
        seen = seen.__cause__ or seen.__context__
    for pattern in (r"OpOverload\(op='([\w.]+)'", r"target=torch\.ops\.([\w.]+)", r"operator '([\w:.]+)'"):
        found = re.search(pattern, text)
        if found:
            return found.group(1).removesuffix(".default")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else exc.__class__.__name__


def export_onnx(model: nn.Module, meta: dict, out: Path) -> float:
    _needs("onnx", "onnxscript", "onnxruntime")
    import onnx
    import onnxruntime

    example = _check_inputs(meta["image_size"])[-1]  # batch > 1: torch.export would specialize a batch of 1
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes=({0: batch},), verbose=False)
    except Exception as exc:  # noqa: BLE001 - torch.export and the ONNX translation raise many types
        raise UserError(f"{meta['arch']} cannot be exported to ONNX: {_failed_op(exc)} has no ONNX translation; "
                        f"export to torchscript or safetensors instead") from None
    proto = program.model_proto
    for key, value in export_metadata(meta).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=json.dumps(value)))
    _write(out, lambda tmp: onnx.save_model(proto, str(tmp)))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return _compare(model, lambda x: session.run([OUTPUT], {INPUT: x.numpy()})[0], meta["image_size"])


def export_torchscript(model: nn.Module, meta: dict, out: Path) -> float:
    example = _check_inputs(meta["image_size"])[-1]
    with warnings.catch_warnings():  # torch.jit is deprecated upstream, but libtorch (C++) still loads it
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as exc:  # noqa: BLE001 - tracing raises whatever the model's forward raises
            raise UserError(f"{meta['arch']} cannot be traced to TorchScript: {_failed_op(exc)}; export to onnx "
                            f"or safetensors instead") from None
        extra = {TORCHSCRIPT_META: json.dumps(export_metadata(meta))}
        _write(out, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files=extra))
        loaded = torch.jit.load(str(out), map_location="cpu")
    return _compare(model, lambda x: loaded(x).detach(), meta["image_size"])


def safetensors_meta_path(out: Path) -> Path:
    return Path(out).with_suffix(".json")


def export_safetensors(model: nn.Module, meta: dict, out: Path) -> float:
    _needs("safetensors")
    from safetensors.torch import load_model, save_model

    info = export_metadata(meta)
    # save_model drops the duplicates of shared tensors (tied weights), which save_file refuses
    _write(out, lambda tmp: save_model(model, str(tmp), metadata={"kd": json.dumps(info)}))
    _write(safetensors_meta_path(out), lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    reloaded = copy.deepcopy(model)  # with every weight zeroed: the file alone must restore the outputs
    with torch.no_grad():
        for tensor in reloaded.state_dict().values():
            tensor.zero_()
    load_model(reloaded, str(out))
    return _compare(model, lambda x: reloaded(x).detach(), meta["image_size"])


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript, "safetensors": export_safetensors}


def _write(out: Path, save) -> None:
    """Writes through a temporary file in the same folder, so `out` is the old file or the complete new one."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes owner-only files; the others follow the umask
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def _check_writable(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()  # a real probe: os.access is always true for root
    except OSError as exc:
        raise UserError(f"--out {out} cannot be written ({exc.strerror}): pass a path in a folder you can write "
                        f"to") from None
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: pass a file name, e.g. {out / 'model'}.onnx")


def export(model_file: str | Path, fmt: str, out: str | Path) -> dict:
    """Exports the model in `model_file` (a kd model file or a run dir) and checks it; returns what it did."""
    if fmt not in EXPORTERS:
        raise UserError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    source = resolve_model_path(model_file)
    model, meta = load_model_file(source)
    out = Path(out).expanduser()
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the model file itself: pass another path (an export never replaces its "
                        f"source)")
    _check_writable(out)
    max_diff = EXPORTERS[fmt](model, meta, out)
    return {"format": fmt, "source": str(source), "out": str(out), "bytes": out.stat().st_size,
            "max_abs_diff": max_diff, "checked_batches": list(CHECK_BATCHES)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a kd model file (model_best.pt) or a run's output dir")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx, torchscript or safetensors")
    parser.add_argument("--out", required=True, type=Path, help="the file to write (safetensors: its metadata "
                        "goes to the same name with .json)")
    args = parser.parse_args(argv)
    with user_errors():
        result = export(args.model, args.format, args.out)
        extra = f" and {safetensors_meta_path(args.out)}" if args.format == "safetensors" else ""
        print(f"wrote {result['out']}{extra} ({result['bytes'] / 2**20:.2f} MiB) from {result['source']}; checked "
              f"against torch on batches of {' and '.join(map(str, CHECK_BATCHES))}: max |diff| "
              f"{result['max_abs_diff']:.2e}")
        return result


if __name__ == "__main__":
    main()
