"""The package tree is the architecture: every import (module level or inside a function, relative
or absolute, `from mmcap import x` included) runs down the layers, and a model built for training
loads nothing of the inference fast paths (`mmcap.accel`)."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmcap"
LAYERS = {  # first path part under mmcap/ -> layer, lowest first
    "config": 0, "images": 0, "metrics": 0,
    "data": 1, "model": 1,
    "generation": 2, "accel": 3, "captioner": 4,
    "inference": 5, "training": 5, "serve": 5, "cli": 5,
}
SIDEWAYS = {("data", "model"), ("model", "data")}  # one level, but neither may import the other
TOP_LEVEL = {"__init__.py", "config.py", "images.py", "cli.py", "captioner", "py.typed"}


def imports(path: Path):
    """(line, module parts under mmcap) of every mmcap import in `path`, lazy ones included."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(rel[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "mmcap":
                    yield node.lineno, parts[1:]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = node.module.split(".") if node.module else []
                for a in ([None] if node.module else node.names):
                    yield node.lineno, base + mod + ([a.name] if a else [])
            elif node.module and node.module.split(".")[0] == "mmcap":
                rest = node.module.split(".")[1:]
                for a in ([None] if rest else node.names):
                    yield node.lineno, rest or [a.name]


def test_imports_run_down_the_layers():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue  # the public face re-exports
        src = rel.with_suffix("").parts[0]
        for line, target in imports(path):
            if not target or target[0] not in LAYERS:
                continue  # `from mmcap import __version__`
            dst = target[0]
            if LAYERS[dst] > LAYERS[src] or (src, dst) in SIDEWAYS or (src in ("inference", "serve") and dst == "training"):
                wrong.append(f"{rel}:{line} ({src}) imports mmcap.{'.'.join(target)}")
            if src in ("model", "generation") and dst == "accel":
                wrong.append(f"{rel}:{line}: {src} never imports accel")
    assert wrong == []


def test_only_the_public_face_sits_directly_under_mmcap():
    loose = {p.name for p in PACKAGE.iterdir() if not p.name.startswith((".", "__pycache__"))
             and (p.suffix == ".py" or p.name in TOP_LEVEL)}
    assert loose <= TOP_LEVEL
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(LAYERS) | {"captioner"}


def test_no_file_over_400_lines_and_no_long_function_in_generation():
    long_files = [f"{p.relative_to(PACKAGE)}: {n}" for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 400]
    assert long_files == []
    long_functions = []
    for path in (PACKAGE / "generation").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno > 60:
                long_functions.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno} lines)")
    assert long_functions == []


def test_building_a_model_for_training_loads_no_fast_path():
    code = ("import sys; sys.path.insert(0, 'tests'); import torch\n"
            "from helpers import CAPTIONS, module_args, tiny_config\n"
            "from mmcap import Captioner\n"
            "from mmcap.training import CaptionModule\n"
            "module = CaptionModule(**module_args(**tiny_config(), total_steps=10))\n"
            "module.set_captioner(Captioner.from_config(tiny_config(), captions=CAPTIONS))\n"
            "optimizer = module.configure_optimizers()\n"
            "batch = module.captioner.tokenizer(CAPTIONS, 16)\n"
            "module.captioner(torch.randn(4, 3, 64, 64), **batch).backward()\n"
            "print(sorted(k for k in sys.modules if k.startswith('mmcap.accel')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_moved_module_path_still_imports_with_a_deprecation_warning():
    """0.2's module paths resolve through one alias table (`mmcap.MOVED`) to the new modules."""
    import importlib
    import sys as _sys
    import warnings

    import mmcap

    for old, new in mmcap.MOVED.items():
        _sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
    assert not [p for p in mmcap.MOVED if (PACKAGE / (p.replace("mmcap.", "").replace(".", "/") + ".py")).exists()]
    from mmcap.viz import plot_attention  # the spelling 0.2's notebooks used
    from mmcap.inference.viz import plot_attention as moved

    assert plot_attention is moved
