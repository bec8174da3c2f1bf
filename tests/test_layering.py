"""The package layers (docs/architecture.md): kernels ← model ← quantization ← generation ← evaluation / server ←
entry scripts; no module imports a package above its own layer (checked on the source, every import statement,
including those inside functions)."""
import ast

from tests.helpers import ROOT

LAYER = {"kernels": 0, "model": 1, "quantization": 2, "generation": 3, "evaluation": 4, "server": 4,
         "benchmarking": 5, "tools": 5, "tasks": 5}
ENTRY_SCRIPTS = {"initialize", "generate", "evaluate", "benchmark", "server", "lm_eval_harness"}


def imported_packages(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for package, level in LAYER.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in set(imported_packages(path)):
                # `import server` is the server/ package (a package wins over server.py), checked by its layer
                script = name in ENTRY_SCRIPTS and name not in LAYER
                if LAYER.get(name, -1) > level or (script and level < 5):
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_only_entry_scripts_import_the_server_package():
    users = [f"{path.relative_to(ROOT)}" for package in LAYER if package != "server"
             for path in sorted((ROOT / package).rglob("*.py")) if "server" in set(imported_packages(path))]
    assert not users, users


def test_kernels_export_tensor_ops_only():
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        names = set(imported_packages(path))
        assert not names & {"model", "quantization", "generation", "evaluation"}, path


def test_only_the_lm_eval_entry_imports_the_lm_eval_model():
    """evaluation/harness.py needs lm_eval; lm_eval_harness.py (scripts/lm_eval.sh) alone brings it in."""
    users = []
    for path in sorted(ROOT.glob("*.py")) + [p for package in LAYER for p in sorted((ROOT / package).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module \
                else []
            if any(n.startswith("evaluation.harness") for n in names) and path.name != "lm_eval_harness.py":
                users.append(str(path.relative_to(ROOT)))
    assert not users, users
