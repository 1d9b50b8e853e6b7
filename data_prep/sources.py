"""The raw source table (sources.yaml) and `fetch`: one verified copy of each raw file in the raw cache.

A file is copied from a local mirror when one is given (argument or PTR_DATA_MIRROR), otherwise downloaded (by
pooch) from GitHub at the pinned commit (from the entry's `url` where the raw-file pattern does not serve it, e.g. a Git LFS
file). Every file is checked against its size and sha256 before it is used.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pooch
import requests
import yaml

from data_prep import paths
from data_prep.errors import DataError

pooch.get_logger().setLevel(logging.WARNING)  # no "Downloading ..." line per file: `ptr data` has a progress bar
SOURCES_YAML = Path(__file__).with_name("sources.yaml")
ROLES = ("truth", "few_shot", "refusal", "artifact", "tokenizer")
_REQUIRED_KEYS = {"role", "bytes", "sha256", "repository", "commit", "path"}
_ALLOWED_KEYS = _REQUIRED_KEYS | {"note", "url"}


@dataclass(frozen=True)
class Source:
    name: str  # local path under the raw cache, e.g. "truth/cities.csv"
    role: str
    bytes: int
    sha256: str
    repository: str
    commit: str
    path: str
    url: str
    note: str | None = None


@cache
def source_table() -> dict[str, Source]:
    """All raw files by local name, validated on load."""
    doc = yaml.safe_load(SOURCES_YAML.read_text())
    if not isinstance(doc, dict) or set(doc) != {"url_pattern", "files"}:
        raise DataError(f"{SOURCES_YAML}: top level must have exactly the keys url_pattern and files")
    table = {}
    for name, entry in doc["files"].items():
        where = f"{SOURCES_YAML}, entry {name!r}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: must be a mapping with keys {sorted(_REQUIRED_KEYS)}")
        missing, unknown = _REQUIRED_KEYS - set(entry), set(entry) - _ALLOWED_KEYS
        if missing or unknown:
            raise DataError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
                            f"allowed keys: {sorted(_ALLOWED_KEYS)}")
        if entry["role"] not in ROLES:
            raise DataError(f"{where}: role {entry['role']!r} is not one of {ROLES}")
        fields = {k: str(entry[k]) for k in ("role", "sha256", "repository", "commit", "path")}
        if len(fields["sha256"]) != 64:
            raise DataError(f"{where}: sha256 must be 64 hex digits, got {fields['sha256']!r}")
        table[name] = Source(name=name, bytes=int(entry["bytes"]), note=entry.get("note"),
                             url=entry.get("url") or doc["url_pattern"].format(**fields), **fields)
    return table


def source(name: str) -> Source:
    table = source_table()
    if name not in table:
        raise DataError(f"unknown raw file {name!r}; known raw files (data_prep/sources.yaml): {sorted(table)}")
    return table[name]


def sources_with_role(role: str) -> list[Source]:
    return [s for s in source_table().values() if s.role == role]


def sha256_of(path: Path) -> str:
    return pooch.file_hash(str(path), alg="sha256")


def verify(path: Path, src: Source, fix: str) -> None:
    """Raise DataError unless `path` has the size and sha256 of `src`; `fix` says what to do about it."""
    size, sha = path.stat().st_size, sha256_of(path)
    if size != src.bytes or sha != src.sha256:
        raise DataError(mismatch(path, src, sha, size, fix))


def mismatch(path: Path, src: Source, sha: str, size: int | None, fix: str) -> str:
    actual = f"actual sha256 {sha}" + (f" ({size} bytes)" if size is not None else "")
    return (f"{path} ({src.name}) does not match data_prep/sources.yaml: expected sha256 {src.sha256} "
            f"({src.bytes} bytes), {actual}. Fix: {fix}")


def fetch(name: str, mirror: str | Path | None = None) -> Path:
    """The verified raw file `name` in the raw cache, copied from the mirror or downloaded once if absent.

    pooch does the transfer: into a temporary file beside the target, checked against the pinned sha256, moved
    into place only when it matches. A cached file is verified here rather than by pooch, which would silently
    download a mismatching one again."""
    src = source(name)
    target = paths.raw_dir() / name
    if target.exists():
        verify(target, src, fix=f"delete the cached file {target} and run again (it is fetched anew).")
        return target
    mirror = Path(mirror).expanduser().resolve() if mirror else paths.mirror_dir()
    if mirror is not None:
        origin = mirror / name
        if not origin.is_file():
            raise DataError(f"raw file {name} is not in the mirror {mirror} (expected {origin}). Fix: check the "
                            f"mirror directory (--mirror / PTR_DATA_MIRROR), or unset it to download {src.url}")
        downloader = _copy_from(origin)
        fix = f"check the mirror copy {origin} (it must be a byte-exact copy of {src.url})."
    else:
        downloader = pooch.HTTPDownloader(timeout=60, progressbar=False)
        fix = f"the download from {src.url} is not the pinned file; use a mirror (--mirror / PTR_DATA_MIRROR)."
    try:
        pooch.retrieve(src.url, known_hash=f"sha256:{src.sha256}", fname=target.name, path=target.parent,
                       downloader=downloader)
    except ValueError as exc:  # pooch's hash mismatch; the temporary file is already deleted
        actual = _POOCH_ACTUAL_HASH.search(str(exc))
        raise DataError(mismatch(target, src, actual.group(1) if actual else "unknown", None, fix)) from None
    except (requests.exceptions.RequestException, OSError) as exc:
        note = f" Note: {src.note}" if src.note else ""
        raise DataError(f"could not download {src.name} from {src.url}: {exc}. Fix: use a local mirror of the raw "
                        f"files (--mirror DIR or PTR_DATA_MIRROR).{note}") from exc
    return target


_POOCH_ACTUAL_HASH = re.compile(r"but got ([0-9a-f]{64})")


def _copy_from(origin: Path):
    """A pooch downloader that copies the mirror's file instead of fetching the URL."""
    def copy(url: str, output_file: str, pooch_instance) -> None:
        shutil.copyfile(origin, output_file)
    return copy
