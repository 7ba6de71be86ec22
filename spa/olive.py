"""spa as an Olive pass (the ``olive-ai`` extra; docs/olive.md): ``SpaPrune`` takes an
``ONNXModelHandler``, prunes it with spa (the pass config holds spa prune's options: target, criterion,
allocation, calibration data from an Olive data config), writes the pruned model through spa's safe
writer and returns an ``ONNXModelHandler`` that Olive can quantize or optimise next.

Olive finds a pass through its package config (``olive run --package-config FILE``), which replaces
Olive's own: ``python -m spa.olive package-config -o FILE`` writes Olive's default package config with
``SpaPrune`` added, so one workflow can use spa's pass and Olive's together.

Nothing here is imported by the rest of spa; importing this module imports Olive.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Union

from olive.data.config import DataConfig
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

#: what ``package-config`` adds to Olive's own package config
PASS_ENTRY = {"module_path": "spa.olive.SpaPrune", "supported_providers": ["*"], "supported_accelerators": ["*"],
              "supported_precisions": ["*"], "supported_algorithms": [], "supported_quantization_encodings": []}


class SpaPrune(Pass):
    """Structured pruning of an ONNX model with spa: whole channels, heads and MLP units removed, the
    smaller model validated in onnxruntime before it is written."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        def param(type_, default, description):
            return PassConfigParam(type_=type_, default_value=default, description=description)
        return {
            "target": param(str, None, "a reduction to reach: 'macs=2', 'params=1.5' or 'fidelity=0.99' (else ratio)"),
            "ratio": param(float, 0.3, "the fraction of every prunable group to remove, without a target"),
            "criterion": param(str, "l2", "spa's criterion: l1, l2, lamp, fpgm, bn_scale, random, act_mean, "
                                          "wanda, flap, obspa (spa prune --criterion)"),
            "allocate": param(str, "auto", "how a target spreads over the groups: auto, global, uniform, sensitivity"),
            "compensate": param(str, "auto", "OBS update of the weights that read removed channels: auto, obs, none"),
            "calib": param(str, None, "calibration data: an .npz keyed by input name, 'synthetic' or 'random'"),
            "data_config": PassConfigParam(type_=Union[DataConfig, dict], default_value=None, description=(
                "an Olive data config (or its name) whose batches become the calibration data; overrides calib")),
            "calib_batches": param(int, 8, "batches of data_config (or of calib random) used for calibration"),
            "exclude": param(str, None, "a regular expression over node names: groups touching them are kept whole"),
            "uniform_layers": param(bool, False, "the same widths in every transformer layer"),
            "round_to": param(str, "auto", "keep channel counts multiples of N, or auto: what the CPU's kernels run whole"),
            "seed": param(int, 0, "the seed of random criteria and inputs"),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        from .api import PruneOptions, prune
        output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="spa-olive-") as tmp:
            calib = config.calib
            if config.data_config is not None:
                calib = calibration_file(config.data_config, model, Path(tmp) / "calib.npz", config.calib_batches)
            options = PruneOptions(
                ratio=config.ratio, target=config.target, criterion=config.criterion, allocate=config.allocate,
                compensate=config.compensate, calib=calib, calib_batches=config.calib_batches,
                exclude=config.exclude, uniform_layers=config.uniform_layers, round_to=_round_to(config.round_to),
                seed=config.seed)
            result = prune(model.model_path, options=options, output=output)
        (output.parent / (output.stem + ".spa.json")).write_text(json.dumps(result.report, indent=1))
        beside = [p for p in output.parent.iterdir() if p != output and p.name.startswith(output.name)]
        if beside:   # external data beside the model: Olive takes the folder
            return ONNXModelHandler(model_path=str(output.parent), onnx_file_name=output.name)
        return ONNXModelHandler(model_path=str(output))


def _round_to(value):
    """Olive passes a string: ``auto`` as it is, a number as the int spa takes."""
    return "auto" if str(value).strip().lower() == "auto" else int(value)


def calibration_file(data_config, model, path: Path, batches: int) -> str:
    """The first ``batches`` batches of an Olive data config as an .npz keyed by input name (spa's
    --calib format: the batches laid end to end along the first axis)."""
    import numpy as np
    from olive.common.config_utils import validate_config
    names = [i.name for i in model.load_model().graph.input]
    loader = validate_config(data_config, DataConfig).to_data_container().create_dataloader()
    got = {}
    for k, batch in enumerate(loader):
        if k >= batches:
            break
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(inputs, dict):
            inputs = {names[0]: inputs}
        for name, value in inputs.items():
            value = value.numpy() if hasattr(value, "numpy") else value
            got.setdefault(name, []).append(np.asarray(value))
    if not got:
        raise ValueError("SpaPrune: the data config gave no batches")
    np.savez(path, **{n: np.concatenate(v, axis=0) for n, v in got.items()})
    return str(path)


def package_config() -> dict:
    """Olive's default package config with ``SpaPrune`` added."""
    from olive.package_config import OlivePackageConfig
    doc = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    doc["passes"]["SpaPrune"] = PASS_ENTRY
    return doc


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["package-config"] or len(args) not in (1, 3) or (len(args) == 3 and args[1] not in ("-o", "--output")):
        print("usage: python -m spa.olive package-config [-o FILE]", file=sys.stderr)
        return 2
    text = json.dumps(package_config(), indent=1)
    if len(args) == 3:
        Path(args[2]).write_text(text)
        print(f"wrote {args[2]}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
