"""Hostile and faulty inputs for kanc, each built in a folder of its own: payloads that would run code write a marker
file (``MARKER`` beside them), which must never appear.

``build_all(root)`` makes every case and returns ``{name: Case}``; ``Case.model`` is the path a command is given, and
``Case.args`` the extra arguments (an --arch the case needs). The cases are data for the tests in this folder and for
``python tests/trust/measure.py``, which runs every command on every case and prints what happened.
"""

from __future__ import annotations

import io
import json
import os
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

MARKER = "MARKER"


class Payload:
    """Unpickling this object runs ``exec``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@dataclass
class Case:
    """A hostile input: the path a command gets, extra arguments, what a good refusal says (a substring)."""

    model: Path
    says: str
    args: list[str] = field(default_factory=list)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, 8 -> 16 -> 8."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval()


def pickled_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def exported_program() -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=2, max=64)
    return torch.export.export(mlp(), (torch.randn(4, 8),), dynamic_shapes=({0: batch},))


def save_pt2(path: Path) -> Path:
    torch.export.save(exported_program(), path)
    return path


def rewrite_zip(src: Path, dst: Path, edit=None, add=None) -> Path:
    """Copy the zip ``src`` to ``dst`` (then delete ``src``): ``edit(name, data)`` gives the new bytes of an entry
    (names without the archive's top folder), ``add(top)`` a dict of entries to add (full names)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        top = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, edit(info.filename.split("/", 1)[1], data) if edit else data)
        for name, data in (add(top) if add else {}).items():
            zout.writestr(name, data)
    src.unlink()
    return dst


def edit_json(entry: str, change):
    """An ``edit`` for rewrite_zip that applies ``change(dict)`` to the JSON entry ``entry``."""

    def edit(name, data):
        if name != entry:
            return data
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()

    return edit


def _rename_everywhere(old: str, new: str):
    def edit(name, data):
        if name.endswith(".json"):
            return data.decode().replace(json.dumps(old), json.dumps(new)).encode()
        return data

    return edit


# ---- .pt2 ---------------------------------------------------------------------------------------------------------


def pt2_pickled_weight(d: Path, marker: Path) -> Path:
    """A weight marked ``use_pickle`` whose bytes are a malicious pickle (torch.export.load: weights_only=False)."""
    src = save_pt2(d / "clean.pt2")

    def edit(name, data):
        if name == "data/weights/model_weights_config.json":
            doc = json.loads(data)
            doc["config"]["fc1.weight"]["use_pickle"] = True
            return json.dumps(doc).encode()
        if name == "data/weights/" + weight:
            return pickled_payload(marker)
        return data

    weight = _weight_file(src, "fc1.weight")
    return rewrite_zip(src, d / "model.pt2", edit)


def _weight_file(pt2: Path, fqn: str) -> str:
    with zipfile.ZipFile(pt2) as z:
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        return json.loads(z.read(name))["config"][fqn]["path_name"]


def pt2_pickled_sample_inputs(d: Path, marker: Path) -> Path:
    """sample_inputs holding a malicious pickle (the deserializer falls back to weights_only=False)."""
    src = save_pt2(d / "clean.pt2")
    payload = pickled_payload(marker)
    return rewrite_zip(src, d / "model.pt2", lambda n, data: payload if n == "data/sample_inputs/model.pt" else data)


def pt2_opaque_constant(d: Path, marker: Path) -> Path:
    """A constant stored as an opaque object: torch unpickles it with pickle.loads."""
    import pickle

    src = save_pt2(d / "clean.pt2")

    def change(doc):
        entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
        doc["config"]["evil"] = entry

    def add(top):
        return {f"{top}/data/constants/opaque_obj_0": pickle.dumps(Payload(marker))}

    return rewrite_zip(src, d / "model.pt2", edit_json("data/constants/model_constants_config.json", change), add)


def pt2_symbolic_expression(d: Path, marker: Path) -> Path:
    """A shape expression that sympy would eval: torch.export.load runs sympify on it."""
    src = save_pt2(d / "clean.pt2")
    code = f"__import__('os').close(__import__('os').open({str(marker)!r}, 65)) or "

    def change(doc):
        graph = doc["graph_module"]["graph"]
        size = graph["tensor_values"][graph["inputs"][-1]["as_tensor"]["name"]]["sizes"][0]["as_expr"]
        size["expr_str"] = code + size["expr_str"]

    return rewrite_zip(src, d / "model.pt2", edit_json("models/model.json", change))


def pt2_input_name(d: Path, marker: Path) -> Path:
    """An input named with Python code: fx puts placeholder names into the generated forward's signature."""
    src = save_pt2(d / "clean.pt2")
    name = f"x=__import__('os').close(__import__('os').open({str(marker)!r}, 65))"
    return rewrite_zip(src, d / "model.pt2", _rename_everywhere("x", name))


def pt2_guard_code(d: Path, marker: Path) -> Path:
    """Guard code (exec'd into the module's guard function by ExportedProgram.module()) that runs a payload."""
    src = save_pt2(d / "clean.pt2")
    code = f"__import__('os').close(__import__('os').open({str(marker)!r}, 65)) or True"
    return rewrite_zip(src, d / "model.pt2", edit_json("models/model.json", lambda doc: doc.update(guards_code=[code])))


def pt2_operator(d: Path, marker: Path) -> Path:
    """A node that calls os.system through torch's namespace (``torch.os``) instead of an aten op."""
    src = save_pt2(d / "clean.pt2")

    def change(doc):
        node = doc["graph_module"]["graph"]["nodes"][1]
        node["target"] = "torch.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]

    return rewrite_zip(src, d / "model.pt2", edit_json("models/model.json", change))


def pt2_native_code(d: Path, marker: Path) -> Path:
    """An AOTInductor entry: a shared library torch would dlopen."""
    src = save_pt2(d / "clean.pt2")

    return rewrite_zip(src, d / "model.pt2", add=lambda top: {f"{top}/data/aotinductor/model/model.so": b"\x7fELF"})


def pt2_traversal(d: Path, marker: Path) -> Path:
    """Entries whose names climb out of the archive (``../``) or are absolute."""
    src = save_pt2(d / "clean.pt2")
    entries = {"../../evil.py": b"print('hi')"}
    return rewrite_zip(src, d / "model.pt2", add=lambda top: {f"{top}/{k}": v for k, v in entries.items()})


# ---- pickles, manifests, folders -------------------------------------------------------------------------------


def whole_pickle(d: Path, marker: Path) -> Path:
    path = d / "model.pt"
    path.write_bytes(pickled_payload(marker))
    return path


def _weights_with_manifest(d: Path, arch: str, kwargs: dict) -> Path:
    path = d / "model.pt"
    torch.save(mlp().state_dict(), path)
    manifest = {
        "kanc": {"version": "0.1.0", "manifest": 1},
        "format": "state_dict",
        "file": "model.pt",
        "target": "grkan",
        "options": {},
        "blocks": [""],
        "arch": arch,
        "arch_kwargs": kwargs,
    }
    (d / "model.pt.kanc.json").write_text(json.dumps(manifest))
    return path


def manifest_os_system(d: Path, marker: Path) -> Path:
    return _weights_with_manifest(d, "os:system", {"command": f"touch {marker}"})


def manifest_subprocess(d: Path, marker: Path) -> Path:
    return _weights_with_manifest(d, "subprocess:run", {"args": ["touch", str(marker)]})


def manifest_python_file(d: Path, marker: Path) -> Path:
    evil = d / "evil_arch.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\nimport torch\nNet = torch.nn.Identity\n")
    return _weights_with_manifest(d, f"{evil}:Net", {})


def hf_remote_code(d: Path, marker: Path) -> Path:
    """A save_pretrained folder whose config maps AutoModel to Python in the folder (``auto_map``)."""
    folder = d / "hf"
    folder.mkdir()
    code = f"""
        open({str(marker)!r}, "w").close()
        from transformers import PretrainedConfig, PreTrainedModel
        import torch

        class EvilConfig(PretrainedConfig):
            model_type = "evil"

        class EvilModel(PreTrainedModel):
            config_class = EvilConfig

            def __init__(self, config):
                super().__init__(config)
                self.fc = torch.nn.Linear(4, 4)
        """
    (folder / "modeling_evil.py").write_text(textwrap.dedent(code))
    config = {
        "model_type": "evil",
        "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(4, 4), "fc.bias": torch.zeros(4)}, str(folder / "model.safetensors"))
    return folder


def hf_pickled_weights(d: Path, marker: Path) -> Path:
    """A save_pretrained folder (no custom code) whose pytorch_model.bin is a malicious pickle."""
    import transformers

    folder = d / "hf"
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickled_payload(marker))
    return folder


BUILDERS = {
    "pt2_pickled_weight": (pt2_pickled_weight, "pickled"),
    "pt2_pickled_sample_inputs": (pt2_pickled_sample_inputs, "pickled"),
    "pt2_opaque_constant": (pt2_opaque_constant, "pickled"),
    "pt2_symbolic_expression": (pt2_symbolic_expression, "shape expression"),
    "pt2_input_name": (pt2_input_name, "name"),
    "pt2_guard_code": (pt2_guard_code, "guard"),
    "pt2_operator": (pt2_operator, "operator"),
    "pt2_native_code": (pt2_native_code, "AOTInductor"),
    "pt2_traversal": (pt2_traversal, "outside the archive"),
    "whole_pickle": (whole_pickle, "--trust-pickle"),
    "manifest_os_system": (manifest_os_system, "names the architecture 'os:system'"),
    "manifest_subprocess": (manifest_subprocess, "names the architecture 'subprocess:run'"),
    "manifest_python_file": (manifest_python_file, "names the architecture"),
    "hf_remote_code": (hf_remote_code, "auto_map"),
    "hf_pickled_weights": (hf_pickled_weights, "pickled weights"),
}


def build(name: str, root: Path) -> Case:
    """Build the case ``name`` in its own folder under ``root``; the marker goes in that folder."""
    d = root / name
    d.mkdir(parents=True)
    make, says = BUILDERS[name]
    return Case(make(d, d / MARKER), says)


def build_all(root: Path) -> dict[str, Case]:
    return {name: build(name, root) for name in BUILDERS}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode and bytes (files), target (links); compare two to see any change."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if name == MARKER:
                continue  # reported on its own (markers)
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                found[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                found[str(path)] = ("dir", st.st_mode)
            else:
                found[str(path)] = ("file", st.st_mode, path.read_bytes())
    return found


def markers(root: Path) -> list[Path]:
    return sorted(root.rglob(MARKER))
