"""The package's layer order, read from docs/ARCHITECTURE.md, holds for every import in the code.

A module may import from its own package (``latent_vae/<unit>/``) or from a lower layer; never
from a higher layer or from another unit of its own layer, and no import cycle may exist
between modules (lazy imports inside functions count: they are cycles all the same).
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "latent_vae"


def layer_table():
    """unit name -> layer number, from the 'Layers' table of docs/ARCHITECTURE.md."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    layers = {}
    for line in text.splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for unit in re.findall(r"`([\w.]+)`", row.group(2)):
                layers[unit] = int(row.group(1))
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """latent_vae.train.loop -> train; latent_vae.errors -> errors; latent_vae -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path):
    """The latent_vae modules ``path`` imports (a ``from pkg import name`` of a submodule names it)."""
    module, is_package = module_name(path), path.name == "__init__.py"
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "latent_vae" or m.startswith("latent_vae.")}


def graph():
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_unit_of_the_package_has_a_layer():
    layers = layer_table()
    units = {unit_of(m) for m in graph()}
    assert units <= set(layers), f"units missing from docs/ARCHITECTURE.md: {sorted(units - set(layers))}"
    assert set(layers) <= units, f"docs/ARCHITECTURE.md names units that do not exist: {sorted(set(layers) - units)}"


def layer_violations(edges, layers):
    wrong = []
    for module, targets in edges.items():
        for target in targets:
            source_unit, target_unit = unit_of(module), unit_of(target)
            if source_unit != target_unit and layers[target_unit] >= layers[source_unit]:
                wrong.append(f"{module} (layer {layers[source_unit]}) imports {target} (layer {layers[target_unit]})")
    return sorted(wrong)


def import_cycles(edges):
    # a package's __init__ runs with any of its submodules: importing it from inside is not a cycle of design
    edges = {m: {t for t in ts if t in edges and not m.startswith(t + ".")} for m, ts in edges.items()}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_upward_or_sideways_import():
    wrong = layer_violations(graph(), layer_table())
    assert not wrong, "imports against the layer order of docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycles = import_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_report_what_they_guard_against():
    layers = layer_table()
    upward = {"latent_vae.errors": {"latent_vae.train.loop"}, "latent_vae.train.loop": set()}
    assert layer_violations(upward, layers) == ["latent_vae.errors (layer 0) imports latent_vae.train.loop "
                                                f"(layer {layers['train']})"]
    same_layer = {"latent_vae.data.sources": {"latent_vae.losses.kl"}, "latent_vae.losses.kl": set()}
    assert layer_violations(same_layer, layers)  # another unit of the same layer
    cycle = {"latent_vae.a": {"latent_vae.b"}, "latent_vae.b": {"latent_vae.a"}}
    assert import_cycles(cycle) == ["latent_vae.a -> latent_vae.b -> latent_vae.a"]
