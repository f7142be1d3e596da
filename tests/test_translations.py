"""The Chinese catalogue covers every string the UI shows: a string added to the code or a
template without a translation shows up in English on a Chinese page, so this fails instead.
`make messages` updates the catalogue; then translate what it added."""

import shutil
import subprocess
import sys

import pytest

from tests.live_server import ROOT

CATALOGUE = "locale/zh_Hans/LC_MESSAGES/django.po"


def statistics(po) -> str:
    """msgfmt's count of translated, fuzzy and untranslated messages."""
    done = subprocess.run(
        ["msgfmt", "--statistics", "-o", "/dev/null", str(po)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stderr.strip()


@pytest.fixture(scope="module")
def msgfmt():
    if shutil.which("msgfmt") is None:
        pytest.skip("msgfmt (Debian's gettext) is not installed")


def test_every_message_of_the_catalogue_is_translated(msgfmt):
    assert statistics(ROOT / CATALOGUE).endswith("translated messages."), (
        f"{CATALOGUE} has fuzzy or untranslated messages: {statistics(ROOT / CATALOGUE)}"
    )


def test_the_catalogue_has_every_string_of_the_code(msgfmt, tmp_path):
    """makemessages over a copy of the code, starting from the committed catalogue: a string
    the catalogue lacks arrives untranslated (or fuzzy), and the count says so."""
    for name in ("conversations", "qwenweb", "templates", "locale"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "manage.py", tmp_path)
    subprocess.run(
        [sys.executable, "manage.py", "makemessages", "-l", "zh_Hans", "-v0"],
        cwd=tmp_path, check=True, capture_output=True,
        env={"PATH": "/usr/bin:/bin", "QWENWEB_DATA_DIR": str(tmp_path)},
    )  # fmt: skip
    counted = statistics(tmp_path / CATALOGUE)
    assert counted == statistics(ROOT / CATALOGUE), (
        f"strings without a Chinese translation: run `make messages` and translate ({counted})"
    )
