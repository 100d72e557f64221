"""Built-in instruction dataset that needs no download: the running Python's standard-library documentation.

`build_stdlib_dataset` imports a fixed list of standard-library modules, grouped into *families* (text processing,
numbers and math, files and paths, ...), and turns every documented public function, class and method into one
instruction example: the instruction asks about the object ("What does `textwrap.dedent` do?"), the response is the
summary of its own docstring (first paragraph, cleaned of reST markup, cut at a sentence boundary) followed by its
signature. The family is the example's `category`, so `partition_dataset(..., method="category")` gives clients
genuinely different tasks with nothing to download: every machine with Python has the data.

`load_instruction_dataset("builtin:stdlib")` (and therefore `dataset_name: builtin:stdlib` in a federated config)
returns this dataset; options go in a query string, e.g. `builtin:stdlib?max_per_category=200&seed=1`.

Determinism: the same `seed`, the same Python version and the same platform give a byte-identical dataset, whatever
`PYTHONHASHSEED` is and whatever the calling process has imported. Modules, names and methods are visited in sorted
order, set and dict orders never decide anything, signature defaults whose `repr` is not a plain literal (it may hold a
memory address) are shown as `...`, and the introspection runs in a fresh `python -I -S` interpreter, because
third-party packages patch the standard library (`torch` replaces `inspect.getfile`, `transformers` adds methods to
`logging.Logger`). The *content* depends on the Python minor version (docstrings and APIs change between releases)
and, for `os`/`sys`/`time`, on the platform; record the Python version with your results.

This file only imports the standard library at module level (`datasets` is imported when a dataset is built) because
it is also the script that the isolated interpreter runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import random
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: this file also runs as a stdlib-only script (see `collect_stdlib_entries`)
    import datasets

__all__ = [
    "ALL_FAMILIES",
    "BUILTIN_DATASETS",
    "BUILTIN_PREFIX",
    "DEFAULT_FAMILIES",
    "STDLIB_DATASET_NAME",
    "STDLIB_FAMILIES",
    "DocEntry",
    "Family",
    "build_stdlib_dataset",
    "collect_stdlib_entries",
    "list_builtin_datasets",
    "load_builtin_dataset",
]

BUILTIN_PREFIX = "builtin:"
"""Prefix that marks a built-in dataset in `load_instruction_dataset` / `dataset_name`."""

STDLIB_DATASET_NAME = "stdlib"
"""Name of the standard-library documentation dataset (`builtin:stdlib`)."""

MIN_SUMMARY_CHARS = 20
"""Docstring summaries shorter than this are skipped (too little to learn from, e.g. `"Timeout expired."`)."""

MIN_RESPONSE_CHARS = 60
"""Smallest accepted `max_response_chars`."""

COLLECT_TIMEOUT_S = 300
"""Time limit of the isolated interpreter that introspects the standard library."""


@dataclass(frozen=True)
class Family:
    """A family of standard-library modules; its `name` is the `category` of its examples.

    Args:
        name (`str`): the category name.
        description (`str`): one line for the documentation.
        modules (`tuple[str, ...]`): importable module names (e.g. `"os.path"`); the examples are named after them.
    """

    name: str
    description: str
    modules: tuple[str, ...]


STDLIB_FAMILIES: tuple[Family, ...] = (
    Family(
        "text_processing",
        "strings, regular expressions, wrapping, diffs, Unicode, codecs, shell-like splitting",
        ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "shlex"),
    ),
    Family(
        "numbers_math",
        "math, complex math, statistics, fractions, decimals, random numbers",
        ("math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"),
    ),
    Family(
        "files_paths",
        "paths, file-system operations, globbing, temporary files, file comparison",
        ("os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp"),
    ),
    Family(
        "data_structures",
        "containers, heaps, bisection, iterators, functional tools, operators, copying",
        ("collections", "heapq", "bisect", "itertools", "functools", "operator", "copy", "array"),
    ),
    Family(
        "data_formats",
        "JSON, CSV, base64/binascii, URLs, HTML, e-mail utilities, binary structs, INI files, XML",
        (
            "json",
            "csv",
            "base64",
            "binascii",
            "urllib.parse",
            "html",
            "email.utils",
            "struct",
            "configparser",
            "xml.etree.ElementTree",
        ),
    ),
    Family(
        "concurrency",
        "threads, thread/process pools, queues, asyncio, multiprocessing, scheduling",
        ("threading", "concurrent.futures", "queue", "asyncio", "multiprocessing", "sched"),
    ),
    Family(
        "dates_time",
        "dates and times, clocks, calendars, time zones",
        ("datetime", "time", "calendar", "zoneinfo"),
    ),
    Family(
        "system_runtime",
        "interpreter, operating system, platform, introspection, imports, logging",
        ("sys", "os", "platform", "inspect", "importlib", "logging"),
    ),
    Family(
        "compression_hashing",
        "zlib/gzip/bz2/lzma compression, zip and tar archives, hashes, HMAC, secrets",
        ("zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "hashlib", "hmac", "secrets"),
    ),
    Family(
        "testing_debugging",
        "unit tests, doctests, tracebacks, timing, pretty-printing, bytecode disassembly",
        ("unittest", "doctest", "traceback", "timeit", "pprint", "dis"),
    ),
)
"""Every family, in the order examples are collected (an object reachable from two families goes to the first)."""

ALL_FAMILIES: tuple[str, ...] = tuple(f.name for f in STDLIB_FAMILIES)
"""Names of every family."""

DEFAULT_FAMILIES: tuple[str, ...] = ALL_FAMILIES[:8]
"""The families of `builtin:stdlib` when none are given: exactly eight, so that the usual 8-client
`partition="category"` run gives every client exactly one family (with more families than clients the category
partitioner deals whole families round-robin, and some clients get two). Use `families="all"` for all ten."""

_FAMILIES_BY_NAME: dict[str, Family] = {f.name: f for f in STDLIB_FAMILIES}

# Instruction templates. `{qualname}`: `textwrap.dedent`; `{module}`: `textwrap`; `{name}`: `dedent` (`Class.method`
# for methods); `{kind}`: function/class/method/exception class. The `_SIGNATURE_TEMPLATES` are only used for
# examples whose response shows a signature.
_TEMPLATES: tuple[str, ...] = (
    "What does `{qualname}` do?",
    "In Python's `{module}` module, what is `{name}` for?",
    "Explain the purpose of the Python {kind} `{qualname}`.",
    "Describe `{qualname}` from the Python standard library.",
    "I'm using the `{module}` module. What does `{name}` do?",
    "Summarize the documentation of `{qualname}`.",
    "What is the {kind} `{name}` of the `{module}` module used for?",
)
_SIGNATURE_TEMPLATES: tuple[str, ...] = (
    "Explain the purpose of the Python {kind} `{qualname}` and its signature.",
    "How do I call `{qualname}`, and what does it do?",
)

_REST_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]+)`")
_REST_LITERAL = re.compile(r"``([^`]+)``")
_REST_TARGET = re.compile(r"^(.*?)\s*<[^<>]+>$")
_SIGNATURE_LINE = re.compile(r"^[\w.\[\]]+\(.*\)\s*(?:->.*)?$")
_INLINE_SIGNATURE = re.compile(r"^[\w.]+\([^()]*\)\s*(?:-->|->|--)\s*")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_NO_SPLIT_BEFORE = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class DocEntry:
    """One documented standard-library object.

    Args:
        family (`str`): the family (category) name.
        module (`str`): the module it was found in, as imported (e.g. `"os.path"`).
        name (`str`): its name in the module (`"dedent"`, or `"Class.method"` for a method).
        kind (`str`): `"function"`, `"class"`, `"exception class"` or `"method"`.
        signature (`str`): rendered call signature without annotations (`"(text)"`), or `""` when unknown.
        doc (`str`): the object's own docstring, `inspect.cleandoc`-ed.
    """

    family: str
    module: str
    name: str
    kind: str
    signature: str
    doc: str

    @property
    def qualname(self) -> str:
        """`module.name`, e.g. `"textwrap.dedent"`, `"collections.OrderedDict.move_to_end"`."""
        return f"{self.module}.{self.name}"


# --------------------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings and anything written to stdout/stderr while importing and introspecting."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _import(module_name: str) -> Any | None:
    try:
        return importlib.import_module(module_name)
    except Exception:  # a module missing on this build/platform (e.g. no _lzma) is skipped, not fatal
        return None


class _Elided:
    """Stands in for a default whose `repr` is not a plain literal (it may contain a memory address)."""

    def __repr__(self) -> str:
        return "..."


_ELIDED = _Elided()


def _is_plain_literal(value: Any) -> bool:
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, str | bytes):
        return len(value) <= 40
    if isinstance(value, tuple):
        return len(value) <= 4 and all(_is_plain_literal(v) for v in value)
    return False


def _render_signature(obj: Any, drop_first: bool) -> str:
    """`inspect.signature` without annotations, with non-literal defaults elided; `""` when there is none."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError, RecursionError):
        return ""
    params = list(sig.parameters.values())
    if drop_first and params and params[0].name in ("self", "cls"):
        params = params[1:]
    params = [
        p.replace(
            annotation=inspect.Parameter.empty,
            default=p.default if p.default is inspect.Parameter.empty or _is_plain_literal(p.default) else _ELIDED,
        )
        for p in params
    ]
    try:
        text = str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
    except (TypeError, ValueError):
        return ""
    if _ADDRESS.search(text) or text == "(*args, **kwargs)":
        return ""
    return text


def _from_stdlib(obj: Any) -> bool:
    """Whether `obj` was defined by the standard library (not patched in by a third-party package)."""
    module = getattr(obj, "__module__", None)
    return module is None or (isinstance(module, str) and module.split(".", 1)[0] in sys.stdlib_module_names)


def _own_doc(obj: Any) -> str:
    """The object's *own* docstring, cleaned; `""` when it has none (inherited docstrings are not used)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _public_names(module: Any, module_name: str) -> list[str]:
    """`__all__` when the module defines it, else the public names whose objects belong to the module."""
    names = getattr(module, "__all__", None)
    if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names):
        return sorted({n for n in names if not n.startswith("_")})
    base = module_name.rsplit(".", 1)[-1]
    owners = {module_name, base, f"_{base}"}
    return sorted(
        n for n, obj in vars(module).items() if not n.startswith("_") and getattr(obj, "__module__", None) in owners
    )


def _class_methods(cls: type) -> list[tuple[str, Any]]:
    """Public methods defined in the class body itself (not inherited), as `(name, function)`, sorted by name."""
    out = []
    for name in sorted(vars(cls)):
        if name.startswith("_"):
            continue
        attr = vars(cls)[name]
        if isinstance(attr, classmethod | staticmethod):
            attr = attr.__func__
        if (inspect.isfunction(attr) or inspect.ismethoddescriptor(attr) or inspect.isbuiltin(attr)) and _from_stdlib(
            attr
        ):
            out.append((name, attr))
    return out


def _module_entries(family: str, module_name: str, module: Any, seen: set[int]) -> list[DocEntry]:
    entries: list[DocEntry] = []

    def add(name: str, obj: Any, kind: str, signature: str) -> None:
        doc = _own_doc(obj)
        if doc:
            entries.append(DocEntry(family, module_name, name, kind, signature, doc))

    names = _public_names(module, module_name)
    for name in names:
        try:
            obj = getattr(module, name)
        except Exception:
            continue
        if id(obj) in seen or getattr(obj, "__module__", None) == "builtins" or not _from_stdlib(obj):
            continue  # the same object under another name/module, a builtin re-export (e.g. TimeoutError), a patch
        canonical = getattr(obj, "__name__", name)
        if canonical != name and canonical in names and getattr(module, canonical, None) is obj:
            continue  # an alias (`array.ArrayType`): the object is taken under its own name
        if inspect.isclass(obj):
            seen.add(id(obj))
            kind = "exception class" if issubclass(obj, BaseException) else "class"
            add(name, obj, kind, _render_signature(obj, drop_first=False))
            for meth_name, meth in _class_methods(obj):
                if id(meth) not in seen:
                    seen.add(id(meth))
                    add(f"{name}.{meth_name}", meth, "method", _render_signature(meth, drop_first=True))
        elif inspect.isroutine(obj):
            seen.add(id(obj))
            add(name, obj, "function", _render_signature(obj, drop_first=False))
    return entries


def _resolve_families(families: str | Sequence[str] | None) -> list[Family]:
    if families is None:
        wanted = list(DEFAULT_FAMILIES)
    elif isinstance(families, str):
        wanted = list(ALL_FAMILIES) if families == "all" else [f.strip() for f in families.split(",") if f.strip()]
    else:
        wanted = list(families)
    unknown = [f for f in wanted if f not in _FAMILIES_BY_NAME]
    if unknown or not wanted:
        raise ValueError(
            f"Unknown or no families {unknown or wanted}; choose among {list(ALL_FAMILIES)} (or families='all')."
        )
    return [f for f in STDLIB_FAMILIES if f.name in wanted]  # registry order, whatever order was given


def _collect_here(families: Sequence[Family]) -> list[DocEntry]:
    seen: set[int] = set()
    entries: list[DocEntry] = []
    with _quiet():
        for family in families:
            for module_name in family.modules:
                module = _import(module_name)
                if module is not None:
                    entries.extend(_module_entries(family.name, module_name, module, seen))
    return entries


def _collect_isolated(families: Sequence[Family]) -> list[DocEntry]:
    """Run `_collect_here` in a fresh `python -I -S` (no site-packages, no `PYTHON*` variables, no user site)."""
    with tempfile.TemporaryDirectory(prefix="hf_perfit_stdlib_") as tmp:
        out = Path(tmp) / "entries.json"
        cmd = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), ",".join(f.name for f in families), str(out)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=COLLECT_TIMEOUT_S, cwd=tmp)
        return [DocEntry(**row) for row in json.loads(out.read_text(encoding="utf-8"))]


def collect_stdlib_entries(families: str | Sequence[str] | None = None, isolated: bool = True) -> list[DocEntry]:
    """Import the modules of `families` and list their documented public functions, classes and methods.

    Only the object's own docstring counts (methods that inherit theirs are skipped). Private names, objects seen
    earlier (the same object re-exported elsewhere), builtin re-exports and objects not defined by the standard
    library are skipped; a module that fails to import is skipped silently. Imports and attribute access run with
    warnings and stdout/stderr suppressed.

    Args:
        families (`str` or `Sequence[str]`, *optional*): family names (a list, a comma-separated string, or
            `"all"`); defaults to `DEFAULT_FAMILIES`.
        isolated (`bool`, *optional*, defaults to `True`): introspect in a fresh interpreter
            (`sys.executable -I -S`), so that the result does not depend on what the calling process imported or
            patched (e.g. `torch` replaces `inspect.getfile`, `transformers` adds methods to `logging.Logger`), and
            the imports leave the calling process untouched. If that interpreter cannot be run, a warning is issued
            and the introspection runs in-process.

    Returns:
        `list[DocEntry]`: in family order (as in `STDLIB_FAMILIES`), then module order, then sorted names.

    Raises:
        `ValueError`: an unknown family name.
    """
    resolved = _resolve_families(families)
    if isolated:
        try:
            return _collect_isolated(resolved)
        except (OSError, subprocess.SubprocessError, ValueError, TypeError) as err:
            detail = getattr(err, "stderr", None) or b""
            warnings.warn(
                f"Could not introspect the standard library in a fresh interpreter ({type(err).__name__}: {err} "
                f"{detail.decode(errors='replace')[-500:]}); falling back to this process, whose imports may change "
                "the result.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _collect_here(resolved)


# --------------------------------------------------------------------------------------------------------
# Docstring -> response
# --------------------------------------------------------------------------------------------------------


def _clean_rest(text: str) -> str:
    """Strip reST/Sphinx markup from one paragraph and collapse its whitespace."""

    def role(m: re.Match) -> str:
        target = m.group(1)
        titled = _REST_TARGET.match(target)
        if titled and titled.group(1):
            target = titled.group(1)
        target = target.lstrip("!")
        if target.startswith("~"):
            target = target[1:].rsplit(".", 1)[-1]
        return f"`{target}`"

    text = re.sub(r"\\$", "", text, flags=re.MULTILINE)  # C-source line continuations left in docstrings
    text = _REST_ROLE.sub(role, text)
    text = _REST_LITERAL.sub(r"`\1`", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:-1] if text.endswith("::") else text


def _is_prose(paragraph: str) -> bool:
    first = paragraph.lstrip()
    return (
        bool(first)
        and not first.startswith((">>>", "..", "-", "*", "+", "|", "$", "#"))
        and not paragraph[0].isspace()
    )


def _split_signature_line(doc: str) -> tuple[str, str]:
    """Docstrings of C functions sometimes start with a signature line (`"name(args) -> result"`): split it off."""
    first, _, rest = doc.partition("\n")
    if _SIGNATURE_LINE.match(first.strip()) and rest.strip():
        return first.strip(), rest.lstrip("\n -")
    return "", doc


def _as_sentence(text: str) -> str:
    """Drop an old-style inline signature prefix (`"D.count(value) -- return ..."`) and end with punctuation."""
    inline = _INLINE_SIGNATURE.match(text)
    if inline and len(text) > inline.end():
        text = text[inline.end() :]
        text = text[0].upper() + text[1:]
    if text and (text[-1].isalnum() or text[-1] == "_"):
        text += "."
    return text


def _summary_text(doc: str) -> str:
    """First prose paragraph of a docstring, cleaned; the next one too when the first is a stub (< 50 chars)."""
    _, doc = _split_signature_line(doc)
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    parts: list[str] = []
    for paragraph in paragraphs[:2]:
        if not _is_prose(paragraph):
            break
        lines = paragraph.splitlines()
        kept = [lines[0]]
        for line in lines[1:]:
            if line[:1].isspace():  # a nested block (attribute list, literal block, argument-clinic section)
                break
            kept.append(line)
        parts.append(_as_sentence(_clean_rest("\n".join(kept))))
        if len(parts[0]) >= 50 or len(kept) < len(lines):
            break
    text = " ".join(parts)
    if text.endswith(":"):  # "... On Unix:" introduces a list or example that is not part of the summary
        ends = _sentence_ends(text)
        text = text[: ends[-1]] if ends else text[:-1].rstrip() + "."
    return text


def _sentence_ends(text: str) -> list[int]:
    ends = []
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        word = text[:end].rsplit(" ", 1)[-1]
        if word.lower() not in _NO_SPLIT_BEFORE:
            ends.append(end)
    return ends


def _truncate(text: str, max_chars: int) -> str:
    """Cut `text` to at most `max_chars` at the last sentence end that fits, else at a word boundary + `...`."""
    if len(text) <= max_chars:
        return text
    fitting = [e for e in _sentence_ends(text) if e <= max_chars]
    if fitting and fitting[-1] >= MIN_SUMMARY_CHARS:
        return text[: fitting[-1]].rstrip()
    cut = text[: max_chars - 3].rsplit(" ", 1)[0].rstrip(" ,;:")
    return f"{cut}..."


def _response(entry: DocEntry, max_chars: int) -> str:
    """Summary of the docstring, then `Signature: ...` when there is one and it takes at most half the budget."""
    summary = _summary_text(entry.doc)
    if len(summary) < MIN_SUMMARY_CHARS:
        return ""
    signature = entry.signature
    if not signature:
        text_sig, _ = _split_signature_line(entry.doc)
        if text_sig and "(" in text_sig:
            signature = text_sig[text_sig.index("(") :].split("->", 1)[0].rstrip()
    sig_line = f"\n\nSignature: `{entry.qualname}{signature}`" if signature else ""
    if len(sig_line) > max_chars // 2:
        sig_line = ""
    body = _truncate(summary, max_chars - len(sig_line))
    return body + sig_line if len(body) >= MIN_SUMMARY_CHARS else ""


def _instruction(entry: DocEntry, with_signature: bool, rng: random.Random) -> str:
    templates = _TEMPLATES + (_SIGNATURE_TEMPLATES if with_signature else ())
    template = templates[rng.randrange(len(templates))]
    return template.format(qualname=entry.qualname, module=entry.module, name=entry.name, kind=entry.kind)


def _stable_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def build_stdlib_dataset(
    seed: int = 0,
    max_response_chars: int = 300,
    max_per_category: int | None = None,
    families: str | Sequence[str] | None = None,
) -> datasets.Dataset:
    """Build an instruction dataset from the running Python's standard-library documentation.

    Every documented public function, class and method of the modules of `families` (see `STDLIB_FAMILIES`)
    becomes one example: an instruction about it (one of several templates, chosen with `seed`) and, as response,
    the first paragraph of its own docstring — reST roles and literals turned into `` `code` ``, cut at a sentence
    boundary — followed by `Signature: `module.name(args)`` when the signature is known. Objects whose summary is
    shorter than 20 characters, private names, re-exports of an object already taken, and exact duplicate
    responses are skipped.

    Same `seed` + same Python version + same platform -> byte-identical dataset, independent of `PYTHONHASHSEED`.
    The content changes with the Python minor version (docstrings and APIs differ between releases).

    Args:
        seed (`int`, *optional*, defaults to 0): chooses the instruction template of each example. The items and
            responses do not depend on it.
        max_response_chars (`int`, *optional*, defaults to 300): maximum response length in characters (about 80
            SmolLM2 tokens), signature included; the signature is dropped when it would take more than half of it.
        max_per_category (`int`, *optional*): keep at most this many examples per family. The kept items are the
            first ones by SHA-256 of their qualified name: a fixed pseudo-random subset that does not depend on
            `seed` (so the items stay the same across seeds, only the instruction templates change).
        families (`str` or `Sequence[str]`, *optional*): family names, a comma-separated string, or `"all"`;
            defaults to `DEFAULT_FAMILIES` (8 families).

    Returns:
        `datasets.Dataset`: columns `instruction`, `context` (always `""`), `response`, `category` (the family),
        sorted by family (in `STDLIB_FAMILIES` order) then qualified name.

    Raises:
        `ValueError`: an unknown family, `max_response_chars` < 60 or `max_per_category` < 1.

    Example:
        ```python
        >>> ds = build_stdlib_dataset(max_per_category=100)
        >>> sorted(set(ds["category"]))[:2]
        ['concurrency', 'data_formats']
        ```
    """
    if isinstance(max_response_chars, bool) or not isinstance(max_response_chars, int):
        raise ValueError(f"max_response_chars must be an int, got {max_response_chars!r}.")
    if max_response_chars < MIN_RESPONSE_CHARS:
        raise ValueError(f"max_response_chars must be >= {MIN_RESPONSE_CHARS}, got {max_response_chars}.")
    if max_per_category is not None and (isinstance(max_per_category, bool) or max_per_category < 1):
        raise ValueError(f"max_per_category must be None or >= 1, got {max_per_category!r}.")

    order = {name: i for i, name in enumerate(ALL_FAMILIES)}
    rows: list[tuple[DocEntry, str]] = []
    seen_responses: set[str] = set()
    for entry in collect_stdlib_entries(families):
        response = _response(entry, max_response_chars)
        summary = response.split("\n\nSignature:", 1)[0]
        if not response or summary in seen_responses:
            continue
        seen_responses.add(summary)
        rows.append((entry, response))

    if max_per_category is not None:
        by_family: dict[str, list[tuple[DocEntry, str]]] = {}
        for row in rows:
            by_family.setdefault(row[0].family, []).append(row)
        rows = [
            row
            for fam in sorted(by_family, key=order.__getitem__)
            for row in sorted(by_family[fam], key=lambda r: _stable_key(r[0].qualname))[:max_per_category]
        ]
    rows.sort(key=lambda r: (order[r[0].family], r[0].qualname))

    rng = random.Random(seed)
    columns: dict[str, list[str]] = {"instruction": [], "context": [], "response": [], "category": []}
    for entry, response in rows:
        columns["instruction"].append(_instruction(entry, "\n\nSignature: `" in response, rng))
        columns["context"].append("")
        columns["response"].append(response)
        columns["category"].append(entry.family)
    import datasets

    features = datasets.Features({c: datasets.Value("string") for c in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def _parse_stdlib_options(query: str) -> dict[str, Any]:
    allowed: dict[str, Callable[[str], Any]] = {
        "seed": int,
        "max_response_chars": int,
        "max_per_category": lambda v: None if v.lower() in ("", "none") else int(v),
        "families": str,
    }
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ValueError(
                f"Bad option {item!r} for builtin:{STDLIB_DATASET_NAME}; options are key=value pairs joined by '&', "
                f"keys {sorted(allowed)}, e.g. 'builtin:stdlib?max_per_category=200&seed=1'."
            )
        try:
            options[key] = allowed[key](value.strip())
        except ValueError as err:
            raise ValueError(f"Bad value for {key!r} in builtin:{STDLIB_DATASET_NAME}: {value!r}.") from err
    return options


BUILTIN_DATASETS: dict[str, Callable[..., datasets.Dataset]] = {STDLIB_DATASET_NAME: build_stdlib_dataset}
"""Built-in dataset name (after `builtin:`) -> builder function."""


def list_builtin_datasets() -> list[str]:
    """Full names of the built-in datasets, e.g. `["builtin:stdlib"]`."""
    return [f"{BUILTIN_PREFIX}{name}" for name in sorted(BUILTIN_DATASETS)]


def load_builtin_dataset(spec: str) -> datasets.Dataset:
    """Build a built-in dataset from its name, with optional `?key=value&...` options.

    Args:
        spec (`str`): `"builtin:stdlib"`, optionally followed by options, e.g.
            `"builtin:stdlib?max_per_category=200&seed=1&families=text_processing,numbers_math"`; keys are the
            arguments of `build_stdlib_dataset` (`seed`, `max_response_chars`, `max_per_category`, `families`).

    Returns:
        `datasets.Dataset`: the canonical columns `instruction`, `context`, `response`, `category`.

    Raises:
        `ValueError`: an unknown built-in name (the message lists the available ones) or a bad option.
    """
    if not spec.startswith(BUILTIN_PREFIX):
        raise ValueError(f"{spec!r} is not a built-in dataset name; they start with {BUILTIN_PREFIX!r}.")
    name, _, query = spec[len(BUILTIN_PREFIX) :].partition("?")
    builder = BUILTIN_DATASETS.get(name.strip())
    if builder is None:
        raise ValueError(f"Unknown built-in dataset {spec!r}; available: {list_builtin_datasets()}.")
    return builder(**_parse_stdlib_options(query))


def _main(argv: Sequence[str]) -> None:
    """Script entry point of the isolated introspection: `python -I -S builtin_data.py FAMILIES OUT_JSON`."""
    families, out = argv
    rows = [dataclasses.asdict(e) for e in _collect_here(_resolve_families(families))]
    Path(out).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    _main(sys.argv[1:])
