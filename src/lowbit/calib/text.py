"""Real text for calibration and evaluation, from files that ship inside PyPI packages.

* Wikipedia: gensim's test data holds 103+ real English articles (a WikiText
  stand-in). They are split *by article*, every fifth one held out, so
  calibration text and evaluation text never overlap.
* Botchan (Project Gutenberg, public domain) from sentencepiece's sdist: an
  out-of-domain second evaluation text.

Both are cleaned once and cached as plain .txt files; users pass their own text
with --eval-text / --calib-text and it goes through the same tokenizer path.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.formats.atomic import atomic_file
from lowbit.model.default import cache_dir

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELD_OUT_EVERY = 5
SENTENCEPIECE_SDIST = "sentencepiece==0.2.3"


def text_dir() -> Path:
    d = cache_dir() / "text"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _clean_wiki(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wiki_articles() -> list[tuple[str, str]]:
    """(title, cleaned text) of every real article in gensim's Wikipedia test dump, in dump order."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("gensim is not installed; run `pip install gensim==4.4.0` (make demo does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.is_file():
        raise LowbitError(f"{path}: missing from the gensim package; reinstall gensim==4.4.0")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(path) as fh:
        for title, markup, _pid in extract_pages(fh, filter_namespaces=("0",)):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = _clean_wiki(filter_wiki(markup))
            if len(text) > 200:
                articles.append((title, text))
    return articles


def _write_text(path: Path, text: str) -> Path:
    with atomic_file(path, lock=False) as tmp:  # a shared cache: concurrent fills write the same text
        tmp.write_text(text, encoding="utf-8")
    return path


def ensure_wiki_split() -> tuple[Path, Path]:
    """(calibration file, held-out evaluation file), built on first use."""
    calib, held_out = text_dir() / "wiki_calib.txt", text_dir() / "wiki_eval.txt"
    if not (calib.is_file() and held_out.is_file()):
        articles = wiki_articles()
        fmt = [f" = {t} = \n\n{x}\n" for t, x in articles]
        _write_text(calib, "\n".join(a for i, a in enumerate(fmt) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1))
        _write_text(held_out, "\n".join(a for i, a in enumerate(fmt) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1))
    return calib, held_out


def default_calib_text() -> Path:
    return ensure_wiki_split()[0]


def default_eval_text() -> Path:
    return ensure_wiki_split()[1]


def botchan_text() -> Path:
    """Botchan from sentencepiece's sdist, fetched from PyPI once (pip download) and cached."""
    out = text_dir() / "botchan.txt"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               SENTENCEPIECE_SDIST, "-d", tmp]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            raise LowbitError(f"could not fetch {SENTENCEPIECE_SDIST} sdist for botchan.txt; check PyPI access "
                              "or pass --eval-text FILE")
        sdist = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/test/botchan.txt"))
            data = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    return _write_text(out, data)


NAMED_TEXTS = {"wiki": default_eval_text, "wiki-calib": default_calib_text, "botchan": botchan_text}


def resolve_text(arg: str | Path | None, default: str) -> Path:
    """A --eval-text/--calib-text value: a named built-in text or a path to a UTF-8 file."""
    name = str(arg) if arg else default
    if name in NAMED_TEXTS:
        return NAMED_TEXTS[name]()
    path = Path(name)
    if not path.is_file():
        raise LowbitError(f"{path}: text file not found; pass a UTF-8 text file or one of {', '.join(NAMED_TEXTS)}")
    return path


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LowbitError(f"{path}: not valid UTF-8 (byte {exc.start}); convert the file to UTF-8") from None
    if not text.strip():
        raise LowbitError(f"{path}: file is empty; pass a file with real text")
    return text


def check_disjoint(eval_arg: str | None, calib_arg: str | None) -> None:
    """Refuse to evaluate on the calibration text itself: the result would flatter the method."""
    eval_path = resolve_text(eval_arg, "wiki")
    calib_path = resolve_text(calib_arg, "wiki-calib")
    if eval_path.resolve() == calib_path.resolve():
        raise LowbitError(f"{eval_path}: used as both --eval-text and --calib-text; evaluate on held-out text")
