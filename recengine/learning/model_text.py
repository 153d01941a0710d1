"""LightGBM's text model, checked before LightGBM parses it (issue #25).

LightGBM's parser (src/boosting/gbdt_model_text.cpp, src/io/tree.cpp) trusts the text: a tree line
without '=', an array shorter than its tree says, a tree offset past the end, a child or feature index
out of range, a parameter line without ':' make it read or jump outside its buffers, or loop, when
loading or predicting. That aborts or crashes the process: there is no exception to catch.
`check_model_text` accepts the layout LightGBM writes and nothing looser, so its reads stay in bounds.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from recengine.errors import ConfigError

MODEL_FILE = "model.txt"
_DAMAGED = "the model folder is damaged: train the model again (recengine train --output) or download it again."
_INT = r"-?[0-9]{1,10}"
_FLOAT = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?inf"
_TOKEN = {"int": re.compile(_INT), "float": re.compile(_FLOAT)}
_ARRAY = {kind: re.compile(rf"(?:(?:{token})(?: (?:{token}))*)?") for kind, token in (("int", _INT), ("float", _FLOAT))}
_SPACED = ("leaf_features", "leaf_coeff")  # a linear tree's per-leaf lists, each followed by a space (LightGBM skips them)
_HEADER_KEYS = ("version", "num_class", "num_tree_per_iteration", "label_index", "max_feature_idx", "objective",
                "average_output", "feature_names", "monotone_constraints", "feature_infos", "tree_sizes")
_RANKING_OBJECTIVES = ("lambdarank", "rank_xendcg")  # what recengine trains (featureset.OBJECTIVES)
MAX_LEAVES = 131_072  # LightGBM's own bound on num_leaves
# Each tree's arrays: the type of their entries and how many (in leaves, internal nodes, ...).
_TREE_ARRAYS = {
    "split_feature": ("int", "internal"), "split_gain": ("float", "internal"), "threshold": ("float", "internal"),
    "decision_type": ("int", "internal"), "left_child": ("int", "internal"), "right_child": ("int", "internal"),
    "internal_value": ("float", "internal"), "internal_weight": ("float", "internal"), "internal_count": ("int", "internal"),
    "leaf_value": ("float", "leaves"), "leaf_weight": ("float", "leaves"), "leaf_count": ("int", "leaves"),
    "cat_boundaries": ("int", "categories"), "cat_threshold": ("int", "category_words"),
    "leaf_const": ("float", "leaves"), "num_features": ("int", "leaves"),
    "leaf_features": ("int", "linear_terms"), "leaf_coeff": ("float", "linear_terms"),
}
_TREE_SCALARS = ("num_leaves", "num_cat", "is_linear", "shrinkage")
_MAX_TREE_LINES = 22  # LightGBM reads no more lines of one tree
_PARAMETER_LINE = re.compile(r"\[[A-Za-z0-9_]+: [^\"\\\n]*\]")
_IMPORTANCE_LINE = re.compile(rf"[^=\s]+=(?:{_FLOAT})")


class _Unsafe(Exception):
    """What is wrong with a model text; `check_model_text` turns it into the user's message."""

    def __init__(self, reason: str, truncated: bool = False):
        super().__init__(reason)
        self.truncated = truncated


def check_model_text(text: str, file: Path | str = MODEL_FILE) -> tuple[list[str], int]:
    """The feature names and tree count of a LightGBM ranking model text, once it is known that
    LightGBM's parser and predictor will stay in bounds on it; a ConfigError naming `file` otherwise."""
    try:
        return _check_model_text(text.encode())
    except _Unsafe as exc:
        if exc.truncated:
            raise ConfigError(f"{file}: an incomplete LightGBM model ({exc}: the file is truncated or changed); "
                              f"{_DAMAGED}") from None
        raise ConfigError(f"{file}: not a LightGBM ranking model that can be loaded safely ({exc}); {_DAMAGED}") from None


def _check_model_text(data: bytes) -> tuple[list[str], int]:
    if b"\0" in data or b"\r" in data:
        raise _Unsafe("it holds NUL or carriage-return characters, which LightGBM never writes")
    first = data.find(b"\nTree=")
    end = data.find(b"\nend of trees\n", max(first, 0))
    if first < 0 or end < 0:
        raise _Unsafe("no trees, or no 'end of trees' after them", truncated=True)
    header = _check_header(data[:first].decode())
    trees = _tree_blocks(data[first + 1 : end + 1], header.get("tree_sizes"))
    names, last_feature = header["feature_names"], len(header["feature_names"]) - 1
    for number, block in enumerate(trees):
        _check_tree(block.decode(), number, last_feature)
    _check_tail(data[end + 1 :].decode())
    return names, len(trees)


def _check_header(text: str) -> dict[str, Any]:
    """The lines before the first tree: `tree`, then LightGBM's keys once each."""
    lines = [line for line in text.split("\n") if line]
    if not lines or lines[0] != "tree":
        raise _Unsafe("it does not start with LightGBM's 'tree' line")
    values: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if key not in _HEADER_KEYS or key in values or (not sep and key != "average_output"):
            raise _Unsafe(f"header line {line[:60]!r}")
        if "=" in value and key not in ("feature_names", "monotone_constraints"):
            raise _Unsafe(f"header line {line[:60]!r}")
        values[key] = value
    needed = ("num_class", "label_index", "max_feature_idx", "feature_names", "feature_infos")  # LightGBM's own
    missing = [key for key in needed if key not in values]
    if missing:
        raise _Unsafe(f"its header lacks {', '.join(missing)}", truncated=True)
    # One score per row: a ranker's model. num_tree_per_iteration 0 would divide by zero in LightGBM.
    if values["num_class"] != "1" or values.get("num_tree_per_iteration", "1") != "1":
        raise _Unsafe("num_class and num_tree_per_iteration must be 1, as in a ranking model")
    if values.get("objective", _RANKING_OBJECTIVES[0]) not in _RANKING_OBJECTIVES:
        raise _Unsafe(f"objective {values['objective'][:40]!r} is not one of {', '.join(_RANKING_OBJECTIVES)}")
    _whole_number(values["label_index"], "label_index", 0, 2**31 - 2)
    features = _whole_number(values["max_feature_idx"], "max_feature_idx", 0, 2**31 - 2)
    names = values["feature_names"].split(" ")
    if len(names) != features + 1 or not all(names) or len(values["feature_infos"].split(" ")) != features + 1 \
            or not all(values["feature_infos"].split(" ")):
        raise _Unsafe(f"feature_names and feature_infos must each list max_feature_idx + 1 = {features + 1} entries")
    if "monotone_constraints" in values:
        constraints = _numbers(values["monotone_constraints"], "int", "monotone_constraints")
        if len(constraints) != features + 1 or any(c not in (-1, 0, 1) for c in constraints):
            raise _Unsafe("monotone_constraints must hold -1, 0 or 1 for each feature")
    parsed: dict[str, Any] = {"feature_names": names}
    if "tree_sizes" in values:
        parsed["tree_sizes"] = _numbers(values["tree_sizes"], "int", "tree_sizes")
    return parsed


def _tree_blocks(body: bytes, sizes: list[int] | None) -> list[bytes]:
    """The text of each tree (`Tree=N` to the next), in order, agreeing with `tree_sizes` where given
    (LightGBM reads tree N at the offset those sizes add up to, wherever that lands)."""
    starts = [0] + [match.start() + 1 for match in re.finditer(rb"\nTree=", body)]
    blocks = [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)])]
    if sizes is not None and sizes != [len(block) for block in blocks]:
        raise _Unsafe("its trees do not end where tree_sizes says they do", truncated=True)
    return blocks


def _check_tree(block: str, number: int, last_feature: int) -> None:
    lines = block.split("\n")
    if lines[0] != f"Tree={number}" or not block.endswith("\n\n"):
        raise _Unsafe(f"tree {number} is not a 'Tree={number}' line, its fields and a blank line", truncated=True)
    fields: dict[str, str] = {}
    body = lines[1 : lines.index("")]
    if any(lines[len(body) + 1 :]) or not 0 < len(body) <= _MAX_TREE_LINES:
        raise _Unsafe(f"tree {number} has lines after its blank line, or too many or no fields")
    for line in body:
        key, sep, value = line.partition("=")
        if not sep or key in fields or (key not in _TREE_ARRAYS and key not in _TREE_SCALARS):
            raise _Unsafe(f"tree {number}: line {line[:60]!r}")
        fields[key] = value
    where = f"tree {number}"
    leaves = _whole_number(fields.get("num_leaves", ""), f"{where} num_leaves", 1, MAX_LEAVES)
    categories = _whole_number(fields.get("num_cat", ""), f"{where} num_cat", 0, leaves - 1)
    linear = _whole_number(fields.get("is_linear", "0"), f"{where} is_linear", 0, 1)
    if "shrinkage" in fields and not _finite(_numbers(fields["shrinkage"], "float", f"{where} shrinkage")):
        raise _Unsafe(f"{where}: shrinkage must be one finite number")
    arrays = {name: _numbers(value, _TREE_ARRAYS[name][0], f"{where} {name}", spaced=name in _SPACED)
              for name, value in fields.items() if name in _TREE_ARRAYS}
    required = ["leaf_value"] + (["left_child", "right_child", "split_feature", "threshold"] if leaves > 1 else [])
    required += ["cat_boundaries", "cat_threshold"] if categories else []
    required += ["leaf_const", "num_features", "leaf_features", "leaf_coeff"] if linear else []
    missing = [name for name in required if name not in arrays]
    if missing:
        raise _Unsafe(f"{where} lacks {', '.join(missing)}", truncated=True)
    _check_lengths(arrays, where, leaves, categories, linear)
    for name in ("leaf_value", "leaf_const", "leaf_coeff"):
        if name in arrays and not _finite(arrays[name]):
            raise _Unsafe(f"{where}: {name} holds NaN or infinite values")
    if leaves > 1:
        _check_nodes(arrays, where, leaves, categories, last_feature)
    if linear and any(f < 0 or f > last_feature for f in arrays["leaf_features"]):
        raise _Unsafe(f"{where}: leaf_features names a feature beyond max_feature_idx = {last_feature}")


def _check_lengths(arrays: dict[str, list], where: str, leaves: int, categories: int, linear: int) -> None:
    """Each array LightGBM will read has exactly the entries the tree's counts say (it reads that many,
    past the end of a shorter one)."""
    if categories and (arrays["cat_boundaries"][:1] != [0] or arrays["cat_boundaries"] != sorted(arrays["cat_boundaries"])):
        raise _Unsafe(f"{where}: cat_boundaries must start at 0 and never decrease")
    if linear and any(n < 0 for n in arrays["num_features"]):
        raise _Unsafe(f"{where}: num_features must not be negative")
    counts = {"leaves": leaves, "internal": leaves - 1, "categories": categories + 1,
              "category_words": arrays["cat_boundaries"][-1] if categories else None,
              "linear_terms": sum(arrays["num_features"]) if linear and "num_features" in arrays else None}
    for name, values in arrays.items():
        read = leaves > 1 or linear or name in ("leaf_value", "leaf_count")  # all a one-leaf tree reads
        expected = counts[_TREE_ARRAYS[name][1]]
        if read and expected is not None and len(values) != expected:
            raise _Unsafe(f"{where}: {name} has {len(values)} entries where the tree needs {expected}", truncated=True)


def _check_nodes(arrays: dict[str, list], where: str, leaves: int, categories: int, last_feature: int) -> None:
    """Every split reads a feature the model has, every child index is in range, and the nodes form one
    tree from the root: each internal node and each leaf reached exactly once (no cycle to loop on)."""
    if any(f < 0 or f > last_feature for f in arrays["split_feature"]):
        raise _Unsafe(f"{where}: split_feature names a feature beyond max_feature_idx = {last_feature}")
    left, right = arrays["left_child"], arrays["right_child"]
    seen_nodes, seen_leaves, stack = set(), set(), [0]
    while stack:
        node = stack.pop()
        if node in seen_nodes:
            raise _Unsafe(f"{where}: node {node} is reached twice (a cycle)")
        seen_nodes.add(node)
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= leaves - 1:
                    raise _Unsafe(f"{where}: child node {child} does not exist")
                stack.append(child)
            elif ~child >= leaves or ~child in seen_leaves:
                raise _Unsafe(f"{where}: leaf {~child} does not exist or is reached twice")
            else:
                seen_leaves.add(~child)
    if len(seen_nodes) != leaves - 1 or len(seen_leaves) != leaves:
        raise _Unsafe(f"{where}: not every node and leaf hangs from the root")
    for node, kind in enumerate(arrays.get("decision_type", [0] * (leaves - 1))):
        # Bit 0: categorical; bit 1: missing values go left; bits 2-3: the missing type (0, 1 or 2).
        if not 0 <= kind < 12:
            raise _Unsafe(f"{where}: decision_type {kind} at node {node}")
        if kind & 1 and not (float(arrays["threshold"][node]).is_integer() and 0 <= arrays["threshold"][node] < categories):
            raise _Unsafe(f"{where}: categorical split {node} points past the tree's {categories} category sets")


def _check_tail(text: str) -> None:
    """After `end of trees`: feature importances, LightGBM's parameters (each `[key: value]`: a line
    without ':' overruns LightGBM's reader) and `pandas_categorical:null`, nothing else."""
    section = "importances"
    for line in text.split("\n")[1:]:
        if not line or (section == "importances" and (line == "feature_importances:" or _IMPORTANCE_LINE.fullmatch(line))):
            continue
        if section == "importances" and line == "parameters:":
            section = "parameters"
        elif section == "parameters" and line == "end of parameters":
            section = "after"
        elif section == "parameters" and _PARAMETER_LINE.fullmatch(line):
            continue
        elif section in ("importances", "after") and line == "pandas_categorical:null":
            section = "done"
        else:
            raise _Unsafe(f"line {line[:60]!r} after the trees")
    if section == "parameters":
        raise _Unsafe("its parameters have no 'end of parameters'", truncated=True)


def _numbers(value: str, kind: str, what: str, spaced: bool = False) -> list:
    """A LightGBM array (single spaces between entries, or any number of them if `spaced`) as ints or
    floats; a refusal naming `what` for anything else."""
    tokens = value.split() if spaced else value.split(" ") if value else []
    if not (all(_TOKEN[kind].fullmatch(t) for t in tokens) if spaced else _ARRAY[kind].fullmatch(value)):
        raise _Unsafe(f"{what} is not a list of {'whole ' if kind == 'int' else ''}numbers")
    parsed = [int(v) if kind == "int" else float(v) for v in tokens]
    if kind == "int" and any(not -(2**31) <= v < 2**32 for v in parsed):
        raise _Unsafe(f"{what} holds a number beyond 32 bits")
    return parsed


def _whole_number(value: str, what: str, low: int, high: int) -> int:
    if not re.fullmatch(_INT, value) or not low <= int(value) <= high:
        raise _Unsafe(f"{what} = {value[:20]!r}, expected a whole number from {low} to {high}")
    return int(value)


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)
