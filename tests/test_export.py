"""`bonescan export`: ONNX (run by onnxruntime on the CPU) and TorchScript files give torch's
logits on real thoracic crops, for both architectures, and carry the input contract."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from bonescan_model.checkpoint import load_checkpoint, save_checkpoint
from bonescan_model.export import CONTRACT_KEYS, INSTALL_HINT, read_contract
from bonescan_model.network import ModelConfig, build_model
from bonescan_model.preprocess import crop, mirror, model_input, thoracic_crop_box
from bonescan_model.synth import synth_patient
from bonescan_platform.cli import main

# TorchScript is deprecated in torch, and still the format libtorch services load.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:DeprecationWarning")
TOLERANCE = 1e-4
THRESHOLD = 0.35
CONFIGS = {
    "recurrent": ModelConfig(width=4, dilations=(1, 2), recurrence=2),
    "unet": ModelConfig(arch="unet", width=4, unet_depth=2),
}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """(3, 2, 256, 256): three synthetic patients' thoracic crops as the model sees them."""
    views = []
    for index in range(3):
        patient = synth_patient(11, index)
        box = thoracic_crop_box(patient.ant)
        views.append(model_input(crop(patient.ant, box), crop(mirror(patient.post), box)))
    return torch.from_numpy(np.stack(views))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def run(request, crops, tmp_path_factory) -> Path:
    """A run folder holding a checkpoint of a model whose batch-norm statistics have moved off
    their initial values (two passes in training mode), saved as `bonescan train` saves it."""
    config = CONFIGS[request.param]
    torch.manual_seed(0)
    model = build_model(config).train()
    with torch.no_grad():
        model(crops)
        model(crops.flip(-1))
    folder = tmp_path_factory.mktemp(f"run_{request.param}")
    save_checkpoint(folder / "model.pt", model.eval(), config, epoch=3,
                    train_config={"threshold": THRESHOLD, "model": dataclasses.asdict(config)})
    return folder


def _torch_logits(run: Path, views: torch.Tensor) -> np.ndarray:
    model, _, _ = load_checkpoint(run)
    with torch.no_grad():
        return model(views).numpy()


def test_onnx_matches_torch_on_real_crops(run, crops, tmp_path):
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (output,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, output.name) == ("views", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [2, 256, 256]  # a free batch axis
    for views in (crops, crops[1:2]):  # the batch of three, and one crop alone
        logits = session.run(None, {"views": views.numpy()})[0]
        expected = _torch_logits(run, views)
        assert logits.shape == expected.shape == (len(views), 1, 256, 256)
        assert np.abs(logits - expected).max() <= TOLERANCE
    _check_contract(read_contract(out), run)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props == read_contract(out)


def test_torchscript_matches_torch_on_real_crops(run, crops, tmp_path):
    out = tmp_path / "model.ts"
    assert main(["export", "--checkpoint", str(run / "model.pt"), "--format", "torchscript", "--out", str(out)]) == 0
    module = torch.jit.load(str(out), map_location="cpu")
    for views in (crops, crops[:1]):
        with torch.no_grad():
            logits = module(views).numpy()
        assert np.abs(logits - _torch_logits(run, views)).max() <= TOLERANCE
    _check_contract(read_contract(out), run)


def _check_contract(terms: dict[str, str], run: Path) -> None:
    _, config, _ = load_checkpoint(run)
    assert set(terms) == set(CONTRACT_KEYS)
    assert terms["input_shape"] == "B,2,256,256" and terms["output_shape"] == "B,1,256,256"
    assert float(terms["threshold"]) == THRESHOLD and terms["epoch"] == "3"
    assert ModelConfig.from_dict(json.loads(terms["model_config"])) == config
    assert "normalized" in terms["input"] and float(terms["normalization_percentile"]) == 99.5


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint")
    for checkpoint in (notes, tmp_path / "nowhere"):
        assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript",
                     "--out", str(tmp_path / "m.ts")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {checkpoint}") and "\n" not in err, err
    assert not (tmp_path / "m.ts").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(notes), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_missing_export_extra_says_how_to_install(run, tmp_path):
    """A Python where onnxscript cannot be imported (None in sys.modules makes `import` fail as
    for an absent package), running the real command."""
    code = ("import sys; sys.modules['onnxscript'] = None\n"
            "from bonescan_platform.cli import main\n"
            f"sys.exit(main(['export', '--checkpoint', {str(run)!r}, '--format', 'onnx', "
            f"'--out', {str(tmp_path / 'm.onnx')!r}]))")
    env = {**__import__("os").environ, "PYTHONPATH": f"{REPO / 'platform'}:{REPO}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL_HINT in lines[0] and "onnxscript" in lines[0], done.stderr
    assert not (tmp_path / "m.onnx").exists()
