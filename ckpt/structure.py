"""The nested shape of a saved state dict as JSON, so a checkpoint reads back as it was saved.

A node is ``null`` (a leaf: a tensor or value stored under the flat key its path joins to
with ``.``), ``{"dict": [[key, node], ...]}`` (keys ``str`` or ``int``, in order),
``{"list": [node, ...]}`` or ``{"tuple": [node, ...]}``. Saves refuse state dicts whose
paths join to the same flat key, so a leaf's flat key is unique. Version 1 manifests have
no structure: :func:`infer` rebuilds a best guess from the flat keys. Pure, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .errors import CheckpointFormatError

Node = Any  # None | {"dict": [[k, Node]]} | {"list": [Node]} | {"tuple": [Node]}
CONTAINERS = ("dict", "list", "tuple")
MISSING = object()  # what ``build`` returns for a node with nothing selected under it


def join(prefix: str, key: str | int) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def kind(node: Node) -> str | None:
    """"dict", "list" or "tuple"; None for a leaf."""
    return None if node is None else next(iter(node))


def children(node: Node) -> Iterator[tuple[str | int, Node]]:
    """(key or index, child) of a container node."""
    k = kind(node)
    if k == "dict":
        yield from node["dict"]
    elif k is not None:
        yield from enumerate(node[k])


def leaves(node: Node, prefix: str = "") -> Iterator[str]:
    """Flat keys of every leaf, in saved order."""
    if node is None:
        yield prefix
        return
    for key, child in children(node):
        yield from leaves(child, join(prefix, key))


def validate(node: Node, where: str) -> None:
    """Refuse a structure a reader could not walk safely (wrong shapes, unsafe keys)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None:
            continue
        if not isinstance(n, dict) or len(n) != 1 or kind(n) not in CONTAINERS:
            raise CheckpointFormatError(f"{where}: malformed structure node {str(n)[:80]!r}")
        items = n[kind(n)]
        if not isinstance(items, list):
            raise CheckpointFormatError(f"{where}: malformed structure node {str(n)[:80]!r}")
        if kind(n) == "dict":
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and type(item[0]) in (str, int)):
                    raise CheckpointFormatError(f"{where}: malformed structure entry {str(item)[:80]!r}")
                stack.append(item[1])
        else:
            stack.extend(items)


def merge(a: Node, b: Node) -> Node:
    """The union of two ranks' structures: ``a``'s order first, then what only ``b`` has."""
    if a is None or b is None or kind(a) != kind(b):
        return a if a is not None else b
    if kind(a) == "dict":
        out = [[k, child] for k, child in a["dict"]]
        at = {(type(k), k): i for i, (k, _) in enumerate(out)}
        for k, child in b["dict"]:
            i = at.get((type(k), k))
            if i is None:
                out.append([k, child])
            else:
                out[i][1] = merge(out[i][1], child)
        return {"dict": out}
    xs, ys = a[kind(a)], b[kind(b)]
    longer = xs if len(xs) >= len(ys) else ys
    return {kind(a): [merge(x, y) for x, y in zip(xs, ys)] + longer[min(len(xs), len(ys)) :]}


def prune(node: Node, present: set[str], prefix: str = "") -> Node:
    """``node`` without leaves whose flat key is not in ``present`` (another rank's values,
    which only rank 0 stores); a container left empty goes too, except the root."""
    if node is None:
        return None if prefix in present else MISSING
    kept = []
    for key, child in children(node):
        c = prune(child, present, join(prefix, key))
        if c is not MISSING:
            kept.append([key, c] if kind(node) == "dict" else c)
    if not kept and prefix:
        return MISSING
    return {kind(node): kept}


def infer(keys: Iterable[str]) -> Node:
    """A version 1 checkpoint's best-guess structure: nested dicts split at every ``.``,
    decimal parts as ``int`` keys (optimizer state ids). A key whose prefix is itself a leaf
    stays whole at the deepest dict it reaches."""
    root: dict = {}
    for key in keys:
        node, parts = root, key.split(".")
        for i, part in enumerate(parts):
            k: str | int = int(part) if part.isdecimal() and str(int(part)) == part else part
            if i == len(parts) - 1:
                node[k] = None
            elif isinstance(node.get(k, {}), dict):
                node = node.setdefault(k, {})
            else:
                node[".".join(parts[i:])] = None
                break
    return _from_dicts(root)


def _from_dicts(d: dict) -> Node:
    return {"dict": [[k, None if v is None else _from_dicts(v)] for k, v in d.items()]}


def find(node: Node, key: str, prefix: str = "") -> Node:
    """The node whose path joins to ``key``, or MISSING."""
    if prefix == key:
        return node
    for k, child in children(node):
        path = join(prefix, k)
        if key == path or key.startswith(path + "."):
            found = find(child, key, path)
            if found is not MISSING:
                return found
    return MISSING


def build(node: Node, leaf: Callable[[str], Any], select: Callable[[str], bool], prefix: str = "") -> Any:
    """The nested Python object ``node`` describes, with ``leaf(flat_key)`` at each selected
    leaf; containers with nothing selected under them are left out (MISSING at the top)."""
    if node is None:
        return leaf(prefix) if select(prefix) else MISSING
    built = [(k, build(child, leaf, select, join(prefix, k))) for k, child in children(node)]
    kept = [(k, v) for k, v in built if v is not MISSING]
    if not kept and built:
        return MISSING
    if kind(node) == "dict":
        return dict(kept)
    items = [v for _, v in kept]
    return tuple(items) if kind(node) == "tuple" else items


def selector(keys: str | Iterable[str] | None) -> Callable[[str], bool]:
    """Whether a flat key lies in one of the sub-trees ``keys`` name (all when None)."""
    if keys is None:
        return lambda _: True
    prefixes = (keys,) if isinstance(keys, str) else tuple(keys)
    return lambda k: any(k == p or k.startswith(p + ".") for p in prefixes)
