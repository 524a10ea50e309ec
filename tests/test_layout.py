"""The package's shape, checked from its source: layers, no import cycles, no private reach-ins.

Every module under ``mxvision/`` (and, for private names, ``tests/`` and ``bench/``) is parsed
with :mod:`ast`, never imported, so the check is fast and sees imports at module level *and*
inside functions (a lazy import is still a dependency). ``from pkg import sub`` counts as
importing the submodule ``pkg.sub``; the implicit import of a parent package's ``__init__``
that Python performs on ``import pkg.sub`` is not counted, an explicit ``import pkg`` is.

Each checker returns one line per offender (``file:line: what``); each is also run on a tiny
synthetic package with one planted violation, so a checker that silently stopped finding
anything would fail here rather than let the next violation through.
"""
import ast
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mxvision"

#: The intended architecture, lowest layer first. A module may import modules of its own layer
#: and of lower layers only (data flows up: files -> arrays -> datasets -> models -> features ->
#: trained heads -> the verbs that use them -> the command line). An entry names a module or a
#: package (then every module inside it); the root package matches only its own ``__init__``.
LAYERS = [
    ("base", ["mxvision.errors", "mxvision.utils", "mxvision.runtime"]),
    ("io", ["mxvision.io"]),
    ("data", ["mxvision.data"]),
    ("models", ["mxvision.models"]),
    ("features", ["mxvision.features"]),
    ("train", ["mxvision.train"]),
    ("verbs", ["mxvision.inference", "mxvision.segmentation", "mxvision.view_prediction", "mxvision.export"]),
    ("audit", ["mxvision.audit"]),
    ("evaluate", ["mxvision.evaluate"]),
    ("demo, distributed", ["mxvision.demo", "mxvision.distributed"]),
    ("serve", ["mxvision.serve"]),
    ("cli", ["mxvision.cli"]),
    ("entry points", ["mxvision", "mxvision.__main__"]),
]

#: Names of the root package every module may import (a constant defined before anything else,
#: so importing it can neither cycle nor pull a higher layer in).
ROOT_CONSTANTS = {"__version__"}

#: Most modules allowed directly in ``mxvision/``, ``__init__`` and ``__main__`` included.
MAX_TOP_LEVEL_MODULES = 9


# --------------------------------------------------------------------------- reading the source
class Module(NamedTuple):
    name: str       # dotted import name
    path: Path
    display: str    # path shown in messages, relative to the scanned root
    tree: ast.Module
    is_package: bool


class Import(NamedTuple):
    importer: str
    target: str     # an imported project module
    name: str       # the name taken from it ('' when the module itself is imported)
    line: int


def module_name(path):
    """The dotted name Python gives ``path``: its stem plus every enclosing package folder."""
    parts = [] if path.name == "__init__.py" else [path.stem]
    folder = path.parent
    while (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)


def load_modules(root, folders):
    """``{dotted name: Module}`` for every ``.py`` file under ``root/folder`` for each folder."""
    modules = {}
    for folder in folders:
        for path in sorted((Path(root) / folder).rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            name = module_name(path)
            modules[name] = Module(name, path, str(path.relative_to(root)), tree,
                                   path.name == "__init__.py")
    return modules


def _from_base(module, node):
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if not module.is_package:
        package = package[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imports_of(module, known):
    """Every import of a project module in ``module``, at any depth (functions included)."""
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found += [Import(module.name, alias.name, "", node.lineno)
                      for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append(Import(module.name, sub, "", node.lineno))
                elif base in known:
                    found.append(Import(module.name, base, alias.name, node.lineno))
    return found


def _in_package(name, package):
    return name == package or name.startswith(package + ".")


def package_imports(modules, package):
    """Imports between modules of ``package``, minus self-imports and root constants."""
    known = set(modules)
    edges = []
    for module in modules.values():
        if not _in_package(module.name, package):
            continue
        for imp in imports_of(module, known):
            if imp.target == imp.importer or not _in_package(imp.target, package):
                continue
            if imp.target == package and imp.name in ROOT_CONSTANTS:
                continue
            edges.append(imp)
    return edges


# --------------------------------------------------------------------------- the checkers
def find_cycles(modules, package):
    """One line per import cycle: the modules in it and every import that closes it."""
    edges = package_imports(modules, package)
    graph = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.target)
    # Tarjan's strongly connected components (iterative: no recursion limit to hit).
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    offenders = []
    for component in sorted(components, key=min):
        inside = sorted({(modules[e.importer].display, e.line, e.importer, e.target)
                         for e in edges if e.importer in component and e.target in component})
        links = "; ".join(f"{path}:{line} {a} -> {b}" for path, line, a, b in inside)
        offenders.append(f"cycle between {', '.join(sorted(component))}: {links}")
    return offenders


def layer_of(name, layers, package):
    """Index of the layer ``name`` belongs to (its longest matching entry), or None."""
    best, best_len = None, -1
    for level, (_, entries) in enumerate(layers):
        for entry in entries:
            matches = name == entry or (entry != package and name.startswith(entry + "."))
            if matches and len(entry) > best_len:
                best, best_len = level, len(entry)
    return best


def find_upward_imports(modules, package, layers):
    """One line per import of a higher layer, and per module that is in no layer."""
    offenders = []
    for module in sorted(modules.values(), key=lambda m: m.display):
        if _in_package(module.name, package) and layer_of(module.name, layers, package) is None:
            offenders.append(f"{module.display}: {module.name} is in no layer of LAYERS")
    edges = sorted(package_imports(modules, package),
                   key=lambda e: (modules[e.importer].display, e.line))
    for e in edges:
        low, high = layer_of(e.importer, layers, package), layer_of(e.target, layers, package)
        if low is not None and high is not None and high > low:
            offenders.append(f"{modules[e.importer].display}:{e.line}: {e.importer} "
                             f"({layers[low][0]}) imports {e.target} ({layers[high][0]}), "
                             f"a higher layer")
    return offenders


def is_private(name):
    """A leading underscore, but not a dunder (``__version__``) nor ``_`` itself."""
    dunder = name.startswith("__") and name.endswith("__")
    return name.startswith("_") and name != "_" and not dunder


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _scope_bindings(scope, module, known):
    """``{name: project module or None}`` for the names bound directly in ``scope``.

    A name bound to a project module anywhere in the scope counts as that module (so
    ``try: import x as m / except ImportError: m = None`` stays checked); any other binding
    (assignment, argument, loop variable, def) shadows outer imports.
    """
    bound = {}

    def bind(name, value):
        if value is not None or name not in bound:
            bound[name] = value

    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = scope.args
        for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if arg is not None:
                bind(arg.arg, None)
    pending = list(ast.iter_child_nodes(scope))
    while pending:
        node = pending.pop()
        if isinstance(node, _SCOPES):
            if not isinstance(node, ast.Lambda):
                bind(node.name, None)
            pending += list(node.decorator_list) if not isinstance(node, ast.Lambda) else []
            continue
        pending += list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bind(alias.asname, alias.name if alias.name in known else None)
                else:
                    head = alias.name.split(".")[0]
                    bind(head, head if head in known else None)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                bind(alias.asname or alias.name, sub if sub in known else None)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bind(node.id, None)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bind(node.name, None)
    return bound


class _PrivateUses(ast.NodeVisitor):
    """Walks one file with its scopes, collecting uses of other modules' private names."""

    def __init__(self, module, known):
        self.module, self.known, self.found = module, known, []
        self.scopes = []  # (is_class, bindings)

    def report(self, node, what):
        self.found.append(f"{self.module.display}:{node.lineno}: {what}")

    # -- name resolution
    def lookup(self, name):
        for depth, (is_class, bound) in enumerate(reversed(self.scopes)):
            if is_class and depth > 0:
                continue  # a class body's names are not visible inside its methods
            if name in bound:
                return bound[name]
        return None

    def resolve(self, node):
        """The project module an expression (``m``, ``pkg.sub``) denotes, or None."""
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.resolve(node.value)
            if owner and f"{owner}.{node.attr}" in self.known:
                return f"{owner}.{node.attr}"
        return None

    def check(self, node, owner, name):
        """Report ``owner.name`` if it is a private name of another project module."""
        if not is_private(name) or owner == self.module.name:
            return
        own_package = (self.module.name if self.module.is_package
                       else self.module.name.rpartition(".")[0])
        if f"{owner}.{name}" in self.known and own_package == owner:
            return  # a private submodule, shared by its sibling modules and its package
        self.report(node, f"uses {name} of {owner}")

    # -- scopes
    def visit_scope(self, node, is_class=False):
        self.scopes.append((is_class, _scope_bindings(node, self.module, self.known)))
        self.generic_visit(node)
        self.scopes.pop()

    def visit_Module(self, node):
        self.visit_scope(node)

    def visit_FunctionDef(self, node):
        self.visit_scope(node)

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.visit_scope(node, is_class=True)

    # -- the three ways of reaching a name
    def visit_ImportFrom(self, node):
        base = _from_base(self.module, node)
        if base in self.known:
            for alias in node.names:
                self.check(node, base, alias.name)

    def visit_Import(self, node):
        for alias in node.names:
            parts = alias.name.split(".")
            for i in range(1, len(parts)):
                if ".".join(parts[:i]) in self.known:
                    self.check(node, ".".join(parts[:i]), parts[i])

    def visit_Attribute(self, node):
        owner = self.resolve(node.value)
        if owner:
            self.check(node, owner, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node):
        """``getattr(m, "_x")``, ``monkeypatch.setattr(m, "_x", ...)``, ``patch("pkg.m._x")``."""
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        args = node.args
        text = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None
                for a in args]
        if called in ("getattr", "setattr", "hasattr", "delattr") and len(args) >= 2 and text[1]:
            owner = self.resolve(args[0])
            if owner:
                self.check(node, owner, text[1])
        if called in ("setattr", "delattr", "patch") and args and text[0] and "." in text[0]:
            parts = text[0].split(".")
            for i in range(len(parts) - 1, 0, -1):
                if ".".join(parts[:i]) in self.known:
                    self.check(node, ".".join(parts[:i]), parts[i])
                    break
        self.generic_visit(node)


def find_private_uses(modules):
    """One line per use of a private name (``_x``) of one project module from another."""
    known = set(modules)
    found = []
    for module in sorted(modules.values(), key=lambda m: m.display):
        visitor = _PrivateUses(module, known)
        visitor.visit(module.tree)
        found += dict.fromkeys(visitor.found)  # one line per use, even if reached twice
    return found


def top_level_modules(package_dir):
    """The modules directly in ``package_dir``, its ``__init__`` and ``__main__`` included."""
    return sorted(p.name for p in Path(package_dir).glob("*.py"))


# --------------------------------------------------------------------------- the real package
@pytest.fixture(scope="module")
def everything():
    """mxvision, its tests and benches, parsed once for all the checks."""
    return load_modules(ROOT, [PACKAGE, "tests", "bench"])


@pytest.fixture(scope="module")
def package(everything):
    return {name: m for name, m in everything.items() if _in_package(name, PACKAGE)}


def _fail_message(rule, offenders):
    return f"{rule} ({len(offenders)}):\n  " + "\n  ".join(offenders)


def test_the_scan_sees_the_package(package):
    """Guards the checks below against passing vacuously (a wrong root finds no imports)."""
    assert len(package) > 50 and "mxvision.io.images" in package and "mxvision" in package
    edges = {(e.importer, e.target) for e in package_imports(package, PACKAGE)}
    assert ("mxvision.io.images", "mxvision.errors") in edges
    assert ("mxvision.cli.data", "mxvision.data.openi_download") in edges  # an import inside a function


def test_no_import_cycles(package):
    offenders = find_cycles(package, PACKAGE)
    assert not offenders, _fail_message("import cycles between mxvision modules", offenders)


def test_no_upward_imports(package):
    offenders = find_upward_imports(package, PACKAGE, LAYERS)
    assert not offenders, _fail_message(
        "imports of a higher layer (see LAYERS; move the shared code down instead)", offenders)


def test_no_private_names_across_modules(everything):
    offenders = find_private_uses(everything)
    assert not offenders, _fail_message(
        "private names used outside their module (make them public, or test public behaviour)",
        offenders)


def test_few_modules_directly_in_the_package():
    modules = top_level_modules(ROOT / PACKAGE)
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(modules)} modules directly in mxvision/ (at most {MAX_TOP_LEVEL_MODULES}): "
        f"{', '.join(modules)}")


# --------------------------------------------------------------------------- the checkers can fail
def _write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_is_found_even_through_a_function_level_relative_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "__version__ = '1'\n",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def later():\n    from . import a\n",
        # parent __init__ imported implicitly only: not a cycle
        "pkg/sub/__init__.py": "import pkg.sub.c\n",
        "pkg/sub/c.py": "import pkg.sub.d\n",
        "pkg/sub/d.py": "from pkg import __version__\n",
    })
    offenders = find_cycles(load_modules(tmp_path, ["pkg"]), "pkg")
    assert offenders == ["cycle between pkg.a, pkg.b: pkg/a.py:1 pkg.a -> pkg.b; "
                         "pkg/b.py:2 pkg.b -> pkg.a"]


def test_an_explicit_import_of_the_parent_package_closes_a_cycle(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "from pkg.tool import run\n",
                      "pkg/tool.py": "import pkg\n"})
    assert len(find_cycles(load_modules(tmp_path, ["pkg"]), "pkg")) == 1


def test_an_upward_import_and_an_unplaced_module_are_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "__version__ = '1'\n",
        "pkg/low/__init__.py": "",
        "pkg/low/reader.py": "from pkg import __version__\nimport os\n\ndef f():\n"
                             "    from pkg.high import use\n",
        "pkg/high.py": "from pkg.low import reader\nimport pkg\n",
        "pkg/stray.py": "",
    })
    layers = [("low", ["pkg.low"]), ("high", ["pkg.high"]), ("top", ["pkg"])]
    offenders = find_upward_imports(load_modules(tmp_path, ["pkg"]), "pkg", layers)
    assert offenders == ["pkg/stray.py: pkg.stray is in no layer of LAYERS",
                         "pkg/high.py:2: pkg.high (high) imports pkg (top), a higher layer",
                         "pkg/low/reader.py:5: pkg.low.reader (low) imports pkg.high (high), "
                         "a higher layer"]


def test_every_way_of_reaching_a_private_name_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "_SECRET = 1\n\ndef _helper():\n    return _SECRET\n",
        "pkg/_impl.py": "",
        "pkg/inner/__init__.py": "from pkg.inner import _own\n",  # its package's private module
        "pkg/inner/_own.py": "",
        "pkg/inner/user.py": "from . import _own\nfrom pkg import _impl\n",
        "pkg/b.py": "from pkg.a import _SECRET\n"
                    "from . import a\n"
                    "import pkg.a\n"
                    "from pkg import _impl\n"
                    "a._helper()\n"
                    "pkg.a._SECRET\n"
                    "def f(trainer):\n"
                    "    a = object()\n"
                    "    return a._x, trainer._updaters, pkg.__name__\n",
        "tests/test_b.py": "from pkg import a\n\n"
                           "def test_it(monkeypatch):\n"
                           "    monkeypatch.setattr(a, '_SECRET', 2)\n"
                           "    monkeypatch.setattr('pkg.a._helper', len)\n"
                           "    assert getattr(a, '_helper')\n",
    })
    found = find_private_uses(load_modules(tmp_path, ["pkg", "tests"]))
    assert found == ["pkg/b.py:1: uses _SECRET of pkg.a",
                     "pkg/b.py:5: uses _helper of pkg.a", "pkg/b.py:6: uses _SECRET of pkg.a",
                     "pkg/inner/user.py:2: uses _impl of pkg",
                     "tests/test_b.py:4: uses _SECRET of pkg.a",
                     "tests/test_b.py:5: uses _helper of pkg.a",
                     "tests/test_b.py:6: uses _helper of pkg.a"]


def test_too_many_top_level_modules_are_counted(tmp_path):
    _write(tmp_path, {f"pkg/m{i}.py": "" for i in range(8)})
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/__main__.py": "", "pkg/sub/x.py": ""})
    assert len(top_level_modules(tmp_path / "pkg")) == 10 > MAX_TOP_LEVEL_MODULES
