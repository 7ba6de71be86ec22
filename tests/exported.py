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


def ops(path):
    """How many nodes of each operator type the model file holds."""
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
