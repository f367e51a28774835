"""The docs a newcomer reads name only things that exist: every relative link (file and #anchor)
and every backticked repository path or dotted Python name in README.md, docs/ARCHITECTURE.md,
docs/API.md and colabs/README.md resolves.

Extraction rules (simple on purpose; fenced code blocks are skipped):
- a link is ``[text](target)`` whose target is not a URL; ``path#anchor`` must name an existing
  file and, for a Markdown file, one of its headings by GitHub's anchor slug;
- a backticked span that is a path under ``fedjax_lm/``, ``configs/``, ``experiments/``,
  ``tests/``, ``docs/`` or ``colabs/`` (letters, digits, ``_ . / -`` only) must exist, with
  ``.py`` appended for a notebook named without it; ``path::name`` must also define ``name``,
  and a bare ``test_name`` must be a test defined in ``tests/``;
- a backticked dotted name ``a.b[.c...]`` whose first part is ``fedjax_lm``, ``experiments`` or
  a module of fedjax_lm (``fedjax_lm/**/a.py`` or a package ``a``) must import or getattr from
  one of them, or be a key of ``config_lib.base_config()`` (``outer.delay``); names ending in a
  file extension (``metrics.jsonl``) are files in a run directory, and names starting with a
  value of the docs' code (``state.islands``: the engine's state) are fields, not modules.
"""

import ast
import glob
import importlib
import importlib.util
import os
import re
import unicodedata

import pytest

from conftest import ROOT

DOCS = ("README.md", "docs/ARCHITECTURE.md", "docs/API.md", "colabs/README.md")
PATH_RE = re.compile(r"(fedjax_lm|configs|experiments|tests|docs|colabs)/[\w./-]*(::\w+)?")
NAME_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
FILE_EXTENSIONS = {"py", "md", "json", "jsonl", "ipynb", "txt", "log", "png", "sh", "model",
                   "so", "yaml", "toml", "csv", "pem"}
VALUES = {"state"}  # the engine's state in the docs' code: state.islands.params is a field


def _prose(path: str) -> str:
  """The file's text without its fenced code blocks."""
  text = open(os.path.join(ROOT, path), encoding="utf-8").read()
  return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, markup and punctuation dropped (letters,
  digits, ``_``, ``-`` and spaces kept), spaces to hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
  kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
  return kept.replace(" ", "-")


def anchors(path: str) -> set[str]:
  """Every heading anchor of a Markdown file (a repeated slug gets -1, -2, ...)."""
  out, seen = set(), {}
  for line in _prose(path).splitlines():
    m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      s = slug(m.group(1))
      out.add(s if s not in seen else f"{s}-{seen[s]}")
      seen[s] = seen.get(s, 0) + 1
  return out


def broken_links(doc: str) -> list[str]:
  broken = []
  for target in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
    if re.match(r"[a-z]+:", target):
      continue  # a URL
    path, _, anchor = target.partition("#")
    rel = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
    if not os.path.exists(os.path.join(ROOT, rel)):
      broken.append(f"{target} (no file {rel})")
    elif anchor and rel.endswith(".md") and anchor not in anchors(rel):
      broken.append(f"{target} (no heading #{anchor} in {rel})")
  return broken


def _spans(doc: str) -> list[str]:
  return re.findall(r"`([^`\n]+)`", _prose(doc))


def broken_paths(doc: str) -> list[str]:
  broken = []
  tests = "\n".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "tests", "*.py")))
  for span in _spans(doc):
    if re.fullmatch(r"test_\w+", span) and not re.search(rf"^def {span}\b", tests, re.M):
      broken.append(f"{span} (no such test in tests/)")
    if not PATH_RE.fullmatch(span):
      continue
    path, _, name = span.partition("::")
    full = os.path.join(ROOT, path)
    if not os.path.exists(full) and not os.path.exists(full + ".py"):
      broken.append(span)
    elif name and not re.search(rf"^\s*(def|class) {name}\b", open(full).read(), re.M):
      broken.append(f"{span} (no {name} in {path})")
  return broken


def _modules() -> dict[str, list[str]]:
  """Short name -> the fedjax_lm modules so named (``islands``: fedjax_lm.engine.islands)."""
  out = {}
  for path in glob.glob(os.path.join(ROOT, "fedjax_lm", "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
    out.setdefault(rel.split(".")[-1], []).append(rel)
  return out


def _resolves(module: str, attrs: list[str]) -> bool:
  """Whether ``module`` (or a longer module prefix of ``module.attrs``) has the attributes."""
  for i in range(len(attrs), -1, -1):
    name = ".".join([module, *attrs[:i]])
    try:
      if importlib.util.find_spec(name) is None:
        continue
    except ModuleNotFoundError:
      continue
    if name.split(".")[0] == "experiments":  # commands define absl flags when imported: read
      return not attrs[i:] or attrs[i] in _top_level_names(importlib.util.find_spec(name).origin)
    obj = importlib.import_module(name)
    try:
      for attr in attrs[i:]:
        obj = getattr(obj, attr)
    except AttributeError:
      return False
    return True
  return False


def _top_level_names(path: str) -> set[str]:
  """The functions, classes and assigned names at the top of the module at ``path``."""
  names = set()
  for node in ast.parse(open(path, encoding="utf-8").read()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names |= {t.id for t in targets if isinstance(t, ast.Name)}
  return names


def _is_config_key(name: str, config) -> bool:
  node = config
  for part in name.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def broken_names(doc: str) -> list[str]:
  from fedjax_lm import config_lib  # pylint: disable=g-import-not-at-top
  config, modules, broken = config_lib.base_config(), _modules(), []
  for span in _spans(doc):
    if not NAME_RE.fullmatch(span) or span.rsplit(".", 1)[1] in FILE_EXTENSIONS:
      continue
    first, *attrs = span.split(".")
    if first in VALUES:
      continue
    if first in ("fedjax_lm", "experiments"):
      candidates = [(first, attrs)]
    elif first in modules:
      candidates = [(m, attrs) for m in modules[first]]
    else:
      continue  # another library's name (jax.jit, optax.sgd)
    if not (any(_resolves(m, a) for m, a in candidates) or _is_config_key(span, config)):
      broken.append(span)
  return broken


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
  assert not broken_links(doc), broken_links(doc)


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_repository_path_exists(doc):
  assert not broken_paths(doc), broken_paths(doc)


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_python_name_exists(doc):
  assert not broken_names(doc), broken_names(doc)


def test_the_checks_catch_what_they_should():
  """The rules themselves: GitHub's slugs, and a made-up link, path and name are found."""
  assert slug("Eager updates and the naive delayed outer step (Kale et al. 2025)") == (
      "eager-updates-and-the-naive-delayed-outer-step-kale-et-al-2025")
  assert slug("The engine (`fedjax_lm/engine/`)") == "the-engine-fedjax_lmengine"
  assert "runtime-defaults-and-what-each-is-worth" in anchors("docs/performance.md")
  assert _resolves("fedjax_lm.cpu", ["apply_defaults"])
  assert not _resolves("fedjax_lm.cpu", ["no_such_function"])
  from fedjax_lm import config_lib  # pylint: disable=g-import-not-at-top
  assert _is_config_key("outer.delay", config_lib.base_config())
  assert not _is_config_key("outer.no_such_key", config_lib.base_config())
