"""The import rules, checked by reading the source (no import of vLLM or torch needed).

1. ``sae_runtime/engine/`` (the API process) and ``sae_runtime/worker/`` (the vLLM worker)
   never import each other; what both must agree on is ``sae_runtime/protocol/``.
2. ``sae_runtime/protocol/`` imports neither of them (nor vLLM): it is the contract only.
3. vLLM's public API is what its top-level package exports (``from vllm import
   SamplingParams``). Any other vLLM module (``vllm.v1...``, ``vllm.config...``, ``import
   vllm.envs``) is imported only by ``sae_runtime/vllm_surface.py``, which states the vLLM
   version it was written for and lists what it assumes (``tests/test_vllm_surface.py``).
   One exception, by design: ``server/openai_models.py`` subclasses vLLM's OpenAI protocol
   models (``vllm.entrypoints...protocol``) so that every parameter vLLM's own server
   accepts works here; it may import those protocol modules and nothing else of vLLM's
   internals, and ``vllm_surface.ASSUMPTIONS`` checks what it relies on.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("sae_runtime", "server", "clients", "benchmarks", "scripts")
SURFACE = "sae_runtime/vllm_surface.py"
OPENAI_PROTOCOL = "server/openai_models.py"


def _is_openai_protocol(module: str) -> bool:
    return module.startswith("vllm.entrypoints.") and module.endswith(".protocol")


def _modules() -> list[Path]:
    files = []
    for d in SOURCE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return files


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every import in ``path`` (relative imports resolved),
    including those inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def violations(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    found = []
    for line, module, names in imports_of(path):
        # `from sae_runtime import worker` names the package in `names`
        targets = [module] + [f"{module}.{n}" for n in names]
        where = f"{rel}:{line}"
        if rel.startswith("sae_runtime/engine/") and any(t.startswith("sae_runtime.worker") for t in targets):
            found.append(f"{where}: the engine imports the worker ({module}); share it through sae_runtime.protocol")
        if rel.startswith("sae_runtime/worker/") and any(t.startswith("sae_runtime.engine") for t in targets):
            found.append(f"{where}: the worker imports the engine ({module}); share it through sae_runtime.protocol")
        if rel.startswith("sae_runtime/protocol/") and any(
                t.startswith(("sae_runtime.engine", "sae_runtime.worker")) or t.split(".")[0] == "vllm"
                for t in targets):
            found.append(f"{where}: the protocol imports {module}; it must depend on neither end nor on vLLM")
        if rel == OPENAI_PROTOCOL and _is_openai_protocol(module):
            continue
        if rel != SURFACE and module.split(".")[0] == "vllm" and module != "vllm":
            found.append(f"{where}: imports vLLM internals ({module}); go through {SURFACE}")
    return found


def test_the_scan_sees_every_package():
    rels = {p.relative_to(ROOT).as_posix() for p in _modules()}
    for expected in ("sae_runtime/engine/engine.py", "sae_runtime/worker/runtime.py",
                     "sae_runtime/protocol/worker_spec.py", SURFACE, "server/service.py"):
        assert expected in rels


@pytest.mark.parametrize("source, problem", [
    ("from sae_runtime.worker.plugin import HOOKS_ENV\n", "engine imports the worker"),
    ("from sae_runtime import worker\n", "engine imports the worker"),
    ("def f():\n    from ..worker import runtime\n", "engine imports the worker"),
    ("from vllm.v1.engine.async_llm import AsyncLLM\n", "vLLM internals"),
    ("import vllm.envs\n", "vLLM internals"),
])
def test_a_violation_is_reported(tmp_path, monkeypatch, source, problem):
    """The rule itself can fail: a module in the engine package with a forbidden import."""
    bad = tmp_path / "sae_runtime" / "engine" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text(source)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert any(problem in v for v in violations(bad)), violations(bad)


def test_public_vllm_imports_are_allowed(tmp_path, monkeypatch):
    good = tmp_path / "server" / "x.py"
    good.parent.mkdir(parents=True)
    good.write_text("from vllm import SamplingParams\nfrom sae_runtime.protocol import SPEC_KEY\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert violations(good) == []


def test_only_the_openai_models_import_vllms_openai_protocol(tmp_path, monkeypatch):
    source = "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest\n"
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    for rel, allowed in ((OPENAI_PROTOCOL, True), ("server/openai_handler.py", False)):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source + "from vllm.v1.engine.async_llm import AsyncLLM\n")
        problems = violations(path)
        assert any("vllm.v1.engine.async_llm" in v for v in problems)  # internals: never
        assert any("chat_completion.protocol" in v for v in problems) != allowed


def test_import_rules_hold():
    problems = [v for path in _modules() for v in violations(path)]
    assert not problems, "import rules broken:\n" + "\n".join(problems)
