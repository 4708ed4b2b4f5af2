"""One owner for the files torch writes (issue 16, item 2): bonescan_model/checkpoint.py is the
only caller of torch.save / torch.load, so every checkpoint, trainer state and GAN checkpoint
is written atomically and read with weights_only=True, with the same one-line refusals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from bonescan_model.checkpoint import read_file, write_file
from bonescan_model.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_checkpoint_py_is_the_only_caller_of_torch_save_and_load():
    callers = []
    for path in [*(REPO / "bonescan_model").rglob("*.py"), *(REPO / "platform").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("save", "load")
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                callers.append(f"{path.relative_to(REPO)}:{node.lineno}: torch.{node.attr}")
    assert callers and all(c.startswith("bonescan_model/checkpoint.py:") for c in callers), "\n".join(callers)


def test_a_file_round_trips_and_leaves_no_temporary_beside_it(tmp_path):
    blob = {"epoch": 3, "history": [{"epoch": 1, "val_dsc": 0.5}], "weights": torch.arange(4.0)}
    path = write_file(tmp_path / "sub" / "state.pt", blob)
    back = read_file(path)
    assert back["epoch"] == 3 and back["history"] == blob["history"] and torch.equal(back["weights"], blob["weights"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]


class _Code:  # unpickling this would import and run code
    pass


@pytest.mark.parametrize("content, reason", [
    (b"not a torch file", "not a bonescan checkpoint (UnpicklingError"),
    ("python object", "holds Python objects"),
    ([1, 2], "holds a list, not a mapping"),
])
def test_anything_else_is_refused_in_one_line_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save({"x": _Code()} if content == "python object" else content, path)
    with pytest.raises(InputError) as err:
        read_file(path)
    assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)
    assert reason.split(" (")[0] in str(err.value)
