"""The converted-model cache: concurrent first uses agree on one complete folder, and nothing half-written is used."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tailored.models import publish_folder


def write_model(tag: str):
    def write(folder: Path) -> None:
        (folder / "config.json").write_text(f'{{"writer": "{tag}"}}')

    return write


def test_a_first_conversion_lands_whole(tmp_path):
    target = publish_folder(tmp_path / "model", write_model("only"))
    assert (target / "config.json").read_text() == '{"writer": "only"}'
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_two_conversions_at_once_end_with_one_folder_and_no_error(tmp_path):
    """Both writers finish staging before either renames: the second rename fails and must use the first's."""
    staged = threading.Barrier(2)
    errors: list[BaseException] = []

    def convert(tag: str) -> None:
        def write(folder: Path) -> None:
            write_model(tag)(folder)
            staged.wait(timeout=10)

        try:
            publish_folder(tmp_path / "model", write)
        except BaseException as error:  # reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=convert, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert (tmp_path / "model" / "config.json").read_text() in ('{"writer": "a"}', '{"writer": "b"}')
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # the loser's staging folder is gone


def test_a_folder_without_config_in_the_way_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "partial.bin").write_text("")
    with pytest.raises(OSError, match=r"model: a folder without config.json is in the way; delete it"):
        publish_folder(tmp_path / "model", write_model("new"))
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
