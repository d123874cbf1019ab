"""LIDC-IDRI CT series from the NCI Imaging Data Commons (IDC), via the `idc-index` package.

idc-index ships IDC's series index in its wheel, so listing the collection's series needs no
network; downloading fetches each series' DICOM files from IDC's public buckets with s5cmd.
The layout on disk is TCIA's, the one pylidc's ``Scan.get_path_to_dicom_files`` looks up
first: ``out/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm``.

A series is fetched into a hidden directory ``out/.<SeriesInstanceUID>.partial`` and renamed
into place only when it holds as many files as the index lists, so an interrupted or failed
download never leaves a partial series, and a rerun skips the series already complete.
idc-index reports a failed download only in its log (after s5cmd's ten retries, about 100 s
without a network) and leaves its temporary manifest behind, so this module probes the bucket
host first, counts the files itself, and gives idc-index a private temporary directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from naslung.console import console
from naslung.fileio import replace_dir

COLLECTION = "lidc_idri"
MODALITY = "CT"
INSTALL_HINT = "naslung download needs idc-index: pip install idc-index"
PROBE_TIMEOUT_S = 5.0
"""How long the connectivity probe waits for the bucket host before giving up."""
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
IDC_LOGGER = "idc_index.index"


class DownloadError(RuntimeError):
    """A listing or download request that cannot be served; the message says what to do."""


@dataclass(frozen=True)
class SeriesEntry:
    """One CT series of LIDC-IDRI as IDC's index lists it."""

    patient_id: str
    series_uid: str
    study_uid: str
    n_files: int
    size_mb: float

    def path(self, out: Path) -> Path:
        """Where the series lives under download root ``out`` (TCIA's layout)."""
        return Path(out) / self.patient_id / self.study_uid / self.series_uid


def list_lidc_series(patients: Sequence[str] | None = None,
                     limit: int | None = None) -> list[SeriesEntry]:
    """LIDC-IDRI's CT series, sorted by patient then series UID, read offline from the index.

    ``patients`` keeps only those patients' series (every id must exist); ``limit`` keeps the
    first ``limit`` series after that.
    """
    if limit is not None and limit < 1:
        raise DownloadError(f"limit must be a positive number of series, got {limit}")
    entries = [SeriesEntry(str(p), str(s), str(t), int(n), float(mb)) for p, s, t, n, mb in _query_index()]
    if patients is not None:
        known = {e.patient_id for e in entries}
        unknown = [p for p in dict.fromkeys(patients) if p not in known]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise DownloadError(f"no LIDC-IDRI CT series for patient(s) {', '.join(unknown[:5])}{more} "
                                f"(ids look like LIDC-IDRI-0001)")
        wanted = set(patients)
        entries = [e for e in entries if e.patient_id in wanted]
    return entries if limit is None else entries[:limit]


def download_lidc(out: Path, series: Sequence[SeriesEntry], progress: bool = True) -> list[Path]:
    """Download ``series`` under ``out`` in TCIA's layout and return their directories.

    Series already complete are skipped. The first failure raises `DownloadError`; the series
    fetched before it stay complete on disk, and nothing of the failed one is left behind.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DownloadError(f"{out} is a file; pass a directory to download into")
    todo = [entry for entry in series if not _is_complete(entry.path(out), entry.n_files)]
    if todo:
        client = _client()
        for k, entry in enumerate(todo, 1):
            if progress:
                console.print(f"[{k}/{len(todo)}] {entry.patient_id} series {entry.series_uid} "
                              f"({entry.n_files} files, {entry.size_mb:.1f} MB)")
            _download_series(client, entry, out, progress)
    return [entry.path(out) for entry in series]


def _query_index() -> list[tuple[Any, ...]]:
    """CT rows of the collection straight from the index's parquet file: well under a second,
    where IDCClient() takes seconds to load the whole index into pandas."""
    try:
        import duckdb
        import idc_index_data
    except ImportError as err:
        raise DownloadError(INSTALL_HINT) from err
    sql = ("SELECT PatientID, SeriesInstanceUID, StudyInstanceUID, instanceCount, series_size_MB "
           "FROM read_parquet(?) WHERE collection_id = ? AND Modality = ? "
           "ORDER BY PatientID, SeriesInstanceUID")
    with duckdb.connect() as con:
        return con.execute(sql, [str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH), COLLECTION,
                                 MODALITY]).fetchall()


def _client() -> Any:
    """An IDCClient, once the bucket host has answered."""
    try:
        from idc_index import IDCClient
        from idc_index.index import aws_endpoint_url
    except ImportError as err:
        raise DownloadError(INSTALL_HINT) from err
    _check_network(urlparse(aws_endpoint_url).hostname or aws_endpoint_url)
    try:
        with _quiet_idc_log():
            return IDCClient()
    except (OSError, subprocess.SubprocessError) as err:  # e.g. its s5cmd binary is missing
        raise DownloadError(f"idc-index could not start: {_one_line(str(err))}") from err


def _check_network(host: str) -> None:
    """Fail in seconds, not after s5cmd's retries, when the bucket host cannot be reached.

    Behind a proxy the host may not resolve locally while s5cmd still gets through, so
    the probe is left to s5cmd there.
    """
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise DownloadError(f"downloading needs network access to the IDC buckets ({host}:443 "
                            f"unreachable: {reason}); nothing was written") from err


def _download_series(client: Any, entry: SeriesEntry, out: Path, progress: bool) -> None:
    final = entry.path(out)
    partial = out / f".{entry.series_uid}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with _quiet_idc_log() as errors, _private_tempdir():
            try:
                client.download_from_selection(downloadDir=str(partial),
                                               seriesInstanceUID=[entry.series_uid],
                                               dirTemplate=None, quiet=True,
                                               show_progress_bar=progress)
            except Exception as err:  # idc-index raises bare Exceptions (e.g. too little disk space)
                raise DownloadError(f"downloading series {entry.series_uid} of {entry.patient_id} "
                                    f"failed: {_one_line(str(err))}; nothing was written for it") from err
        got = _count_files(partial)
        if got != entry.n_files:
            cause = f": {_first_error(errors)}" if errors else ""
            raise DownloadError(f"series {entry.series_uid} of {entry.patient_id} came with {got} of "
                                f"{entry.n_files} files{cause}; nothing was written for it (rerun to retry)")
        final.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _is_complete(directory: Path, n_files: int) -> bool:
    return directory.is_dir() and _count_files(directory) == n_files


def _count_files(directory: Path) -> int:
    return sum(1 for path in directory.glob("*.dcm") if path.is_file())


def _first_error(messages: list[str]) -> str:
    """s5cmd's first ERROR line among idc-index's error log records, else the first record."""
    lines = [line for message in messages for line in message.splitlines()]
    return _one_line(next((line for line in lines if line.lstrip().startswith("ERROR")), messages[0]))


def _one_line(text: str, width: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _quiet_idc_log() -> Iterator[list[str]]:
    """Keep idc-index's INFO chatter off the console and collect s5cmd's error lines."""
    logger = logging.getLogger(IDC_LOGGER)
    handler = _ErrorLog()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@contextmanager
def _private_tempdir() -> Iterator[None]:
    """Point `tempfile` at a private directory, removed afterwards with the manifests and
    logs idc-index leaves there."""
    saved = tempfile.tempdir
    private = tempfile.mkdtemp(prefix="naslung-idc-")
    tempfile.tempdir = private
    try:
        yield
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(private, ignore_errors=True)
