"""The built-in recipes: where they are, their YAML (1.2 booleans), and which one a data set gets."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import yaml

from difftool.errors import UserError, did_you_mean, first_line
from difftool.safeio import JSON_LIMIT, read_bounded


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `mixed_precision: no` stays the string "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


# Far beyond any recipe or config.yaml; beyond them, a YAML bomb (aliases can repeat one list billions of times).
YAML_DEPTH, YAML_VALUES = 32, 100_000


def parse_yaml(text: str):
    """YAML 1.2 booleans, plain types only; nesting too deep for the parser, or more than YAML_DEPTH levels or
    YAML_VALUES values, is a YAMLError like any bad YAML."""
    try:
        value = yaml.load(text, Loader=_Yaml12Loader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to be a recipe") from None
    if not _within_limits(value):
        raise yaml.YAMLError(f"nested deeper than {YAML_DEPTH} levels or holding more than {YAML_VALUES:,} values "
                             f"(YAML aliases can multiply them): not a recipe")
    return value


def _within_limits(value) -> bool:
    """Whether `value` stays within YAML_DEPTH levels and YAML_VALUES values, counted without recursion."""
    stack, seen = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > YAML_DEPTH or seen > YAML_VALUES:
            return False
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return True


def recipe_dir():
    """The built-in recipes: the package `difftool.recipes` once installed, else `recipes/` of a source tree on
    PYTHONPATH (as on a machine where nothing can be installed, such as the GPU check's)."""
    try:
        return resources.files("difftool.recipes")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in recipe_dir().iterdir() if p.name.endswith(".yaml"))


def recipe_text(name_or_path: str) -> str:
    """The YAML text of a built-in recipe name or a path to a recipe file."""
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"recipe file not found: {name_or_path}")
        try:
            return read_bounded(path, JSON_LIMIT, follow=True).decode()
        except (OSError, ValueError, UserError) as err:  # ValueError: not UTF-8; UserError: a FIFO, far too large
            raise UserError(f"cannot read recipe {name_or_path}: {first_line(err)}") from err
    names = recipe_names()
    if name_or_path not in names:
        raise UserError(f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, names)} (difftool recipes list shows them)")
    return (recipe_dir() / f"{name_or_path}.yaml").read_text()


def recipe_summary(name: str) -> str:
    """First comment line of a recipe after its launch command: what the recipe is for."""
    lines = [ln[1:].strip() for ln in recipe_text(name).splitlines() if ln.startswith("#")]
    return next((ln for ln in lines if ln and not ln.startswith(("difftool ", "accelerate "))), "")


def recipe_for_dataset(dataset: str | None, *, gpu: bool = True) -> tuple[str, str]:
    """The recipe `difftool train --dataset X` uses when no --recipe is given, and why.

    A data set that has a recipe of its own (cifar10, mnist) gets it; no data set at all means the
    quickstart. Other hub data sets and local folders get the 64-px recipe on a GPU, and on a CPU the
    32-px one: folder64's 150k steps of a 5-level UNet would take a CPU weeks.
    """
    if dataset is None:
        return "quickstart", "the built-in shapes (no --dataset)"
    for name in recipe_names():
        raw = parse_yaml(recipe_text(name)) or {}
        if (raw.get("data") or {}).get("dataset") == dataset:
            return name, f"the recipe made for {dataset}"
    if gpu:
        return "folder64", "a GPU is present: 64 px"
    return "folder32", ("no GPU here: 32 px and a small UNet, trained until a classifier of your images stops "
                        "seeing gains (--recipe folder64 for 64 px)")


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys (`train.lr`), tuples as lists: two configs compared key by key."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = list(v) if isinstance(v, tuple) else v
    return out
