"""Imports point one way: every edge between the product's packages goes down the map.

The map (docs/layering.md), bottom first. A module may import its own package and any
package below it, never one above: so no cycle between packages can form either.

An edge is any ``import`` or ``from ... import`` anywhere in a module (at the top, inside
functions, under ``TYPE_CHECKING``), and any string constant that names a product module
(registries that import by name, ``python -m`` command lines) if it is dotted.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

LAYERS: list[tuple[str, str]] = [
    ("kvcore", "the KV vocabulary: keys, chunk format, events, buffers"),
    ("store.wire", "the daemon's wire protocol, both ends"),
    ("store.client", "the daemon's client"),
    ("backends", "the media, the remote daemon among them"),
    ("store", "TieredStore, its config, policies' executor, metrics, replay"),
    ("store.daemon", "the daemon's server: it hosts a TieredStore"),
    ("store.cli", "the kvstore command"),
    ("connector", "the connector API and its implementations"),
    ("engine", "the inference engine"),
    ("router", "kvrouter (it tokenizes with the engine's tokenizer)"),
]
"""Packages, bottom first. A package is its dotted prefix minus any package listed apart."""

PACKAGES = ("kvcore", "store", "backends", "connector", "engine", "router")
OUTSIDE = ("benchmarks", "tests", "deploy", "scripts")  # never imported by the product


def product_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def layer_of(module: str, layers: list[tuple[str, str]] = LAYERS) -> int:
    """The index of the longest listed package that ``module`` belongs to."""
    best, rank = -1, -1
    for i, (pkg, _) in enumerate(layers):
        if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > best:
            best, rank = len(pkg), i
    return rank


def _targets(module: str, path: pathlib.Path, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            if path.name != "__init__.py":
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
        return [node.value]  # a dotted module name: a registry entry, a ``-m`` argument
    return []


def edges(mods: dict[str, pathlib.Path]) -> set[tuple[str, str]]:
    """(importer, imported) for every edge between product modules, or out to OUTSIDE."""
    out = set()
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(module, path, node):
                if target.split(".")[0] in OUTSIDE:
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        out.add((module, target.split(".")[0]))
                    continue
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    out.add((module, target))
    return out


def violations(mods: dict[str, pathlib.Path], layers: list[tuple[str, str]] = LAYERS) -> list[str]:
    bad = []
    for src, dst in sorted(edges(mods)):
        if dst in OUTSIDE:
            bad.append(f"{src} -> {dst}: the product never imports {dst}/")
            continue
        a, b = layer_of(src, layers), layer_of(dst, layers)
        if a < 0 or b < 0:
            bad.append(f"{src} -> {dst}: {src if a < 0 else dst} is on no layer of the map")
        elif b > a:
            bad.append(f"{src} -> {dst}: {layers[a][0]} may not import {layers[b][0]} (above it)")
    return bad


def test_every_product_module_is_on_the_map() -> None:
    lost = [m for m in product_modules() if layer_of(m) < 0]
    assert not lost, f"modules on no layer of LAYERS: {lost}"


def test_imports_point_down_the_map() -> None:
    bad = violations(product_modules())
    assert not bad, "imports that point up the map (docs/layering.md):\n" + "\n".join(bad)


def test_the_walk_sees_imports_in_functions_type_checking_and_registries(tmp_path) -> None:
    """The checker itself: an upward import hidden in each way it can hide is reported."""
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    (tmp_path / "high" / "top.py").write_text("X = 1\n")
    (tmp_path / "low" / "a.py").write_text("def f():\n    from high import top\n")
    (tmp_path / "low" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import high.top\n"
    )
    (tmp_path / "low" / "c.py").write_text('REGISTRY = {"x": ("high.top", "Cls")}\n')
    (tmp_path / "low" / "d.py").write_text("from . import a\nfrom benchmarks import x\n")
    mods = {}
    for pkg in ("low", "high"):
        for p in (tmp_path / pkg).glob("*.py"):
            mods[f"{pkg}.{p.stem}"] = p
    layers = [("low", ""), ("high", "")]
    bad = violations(mods, layers)
    assert [b.split(":")[0] for b in bad] == [
        "low.a -> high.top",
        "low.b -> high.top",
        "low.c -> high.top",
        "low.d -> benchmarks",
    ]
    assert violations(mods, [("high", ""), ("low", "")]) == [
        "low.d -> benchmarks: the product never imports benchmarks/"
    ]


@pytest.mark.parametrize("pkg", [p for p, _ in LAYERS])
def test_each_package_exists(pkg: str) -> None:
    path = ROOT / pkg.replace(".", "/")
    assert path.is_dir() or path.with_suffix(".py").is_file(), (
        f"{pkg} is on the map, not in the tree"
    )
