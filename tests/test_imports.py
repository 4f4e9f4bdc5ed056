"""The package's shape: imports only go down, and the Hydra glue is a leaf.

The graph is read from the source (every ``import`` and ``from nanoforge... import``, including
those inside functions, which a runtime check would miss), then sorted topologically: a cycle
anywhere makes the sort fail and names the modules on it.
"""

import ast
import graphlib

import pytest

from tests.helpers import SRC, run_python

PACKAGE = SRC / "nanoforge"


def module_name(path) -> str:
    return "nanoforge" if path.stem == "__init__" else f"nanoforge.{path.stem}"


def import_graph() -> dict[str, set[str]]:
    """module -> the nanoforge modules it imports, anywhere in its source."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanoforge"):
                if node.module == "nanoforge":  # from nanoforge import sweep
                    deps |= {f"nanoforge.{alias.name}" for alias in node.names}
                else:
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("nanoforge.")}
        graph[module_name(path)] = deps - {module_name(path)}
    return graph


def test_imports_name_real_modules_and_form_no_cycle():
    graph = import_graph()
    assert len(graph) >= 15
    for module, deps in graph.items():
        assert deps <= graph.keys(), f"{module} imports a module that does not exist: {deps}"
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert set(order) == graph.keys()


def test_hydra_glue_is_a_leaf_and_the_model_knows_no_framework():
    graph = import_graph()
    # the glue's only nanoforge imports are leaves too: errors, the SLURM launcher's
    # resolvers (registered with the others, before any config is composed), and OpenMP's
    # wait policy (set before torch is imported)
    leaves = {"nanoforge.errors", "nanoforge.machine", "nanoforge.slurm", "nanoforge.threads"}
    assert graph["nanoforge.hydra_setup"] <= leaves
    assert graph["nanoforge.errors"] == set() and graph["nanoforge.slurm"] == set()
    assert graph["nanoforge.machine"] <= {"nanoforge.errors"}
    assert graph["nanoforge.overrides"] == set()
    assert graph["nanoforge.threads"] <= {"nanoforge.errors"}
    # the from-scratch model depends on nothing of the training framework around it
    assert graph["nanoforge.model"] <= {"nanoforge.errors", "nanoforge.sampling"}
    # only the sweep module knows about sweeps; training never imports it
    users_of_sweep = {m for m, deps in graph.items() if "nanoforge.sweep" in deps}
    assert users_of_sweep == set()


@pytest.mark.slow  # a fresh interpreter importing everything: Lightning, transformers, ...
def test_every_module_imports_in_a_fresh_interpreter_and_the_glue_imports_no_torch():
    modules = sorted(import_graph())
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(SRC)!r})\n"
        "import nanoforge.hydra_setup, nanoforge.cli\n"
        "assert 'torch' not in sys.modules, 'the glue or the command line pulled in torch'\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "print('ok')\n"
    )
    r = run_python(code, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# generate.py never importing Lightning: test_hydra_setup.py, in the process that checks what
# each entry point settles
