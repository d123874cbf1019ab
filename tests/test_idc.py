"""LIDC-IDRI listing from idc-index's bundled index (offline) and the download's atomicity."""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from naslung.data import idc
from naslung.data.idc import DownloadError, SeriesEntry, download_lidc, list_lidc_series

idc_index = pytest.importorskip("idc_index")

FIRST_CT = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def test_listing_covers_the_collection():
    series = list_lidc_series()
    assert len(series) == 1018
    assert len({s.patient_id for s in series}) == 1010
    assert series == sorted(series, key=lambda s: (s.patient_id, s.series_uid))
    first = series[0]
    assert (first.patient_id, first.series_uid, first.n_files) == ("LIDC-IDRI-0001", FIRST_CT, 133)
    assert first.size_mb == pytest.approx(70.0, abs=0.1)
    assert first.path(Path("out")) == Path("out/LIDC-IDRI-0001") / first.study_uid / FIRST_CT


def test_listing_filters_by_patient_and_limit():
    assert [s.series_uid for s in list_lidc_series(patients=["LIDC-IDRI-0001"])] == [FIRST_CT]
    assert [s.patient_id for s in list_lidc_series(limit=3)] == [f"LIDC-IDRI-000{i}" for i in (1, 2, 3)]
    two = list_lidc_series(patients=["LIDC-IDRI-0003", "LIDC-IDRI-0001"], limit=1)
    assert [s.patient_id for s in two] == ["LIDC-IDRI-0001"]
    with pytest.raises(DownloadError, match="LIDC-IDRI-9999, nobody"):
        list_lidc_series(patients=["LIDC-IDRI-0001", "LIDC-IDRI-9999", "nobody"])
    with pytest.raises(DownloadError, match="positive"):
        list_lidc_series(limit=0)


def _idc_reachable() -> bool:
    host = urlparse(idc_index.index.aws_endpoint_url).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_download_without_network_fails_fast_and_writes_nothing(tmp_path, monkeypatch):
    if _idc_reachable():
        pytest.skip("this machine reaches IDC's buckets; the offline failure cannot be shown here")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(DownloadError, match="network access to the IDC buckets") as info:
        download_lidc(out, list_lidc_series(limit=1), progress=False)
    assert time.monotonic() - start < 30
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())
    assert not any((tmp_path / "tmp").iterdir())


class FakeClient:
    """Stands in for IDCClient: writes `files_of[uid]` files and, like idc-index, leaves a temporary
    manifest behind and logs s5cmd's errors instead of raising."""

    files_of: dict[str, int] = {}
    calls: list[str] = []
    leftovers: list[Path] = []

    def download_from_selection(self, downloadDir, seriesInstanceUID, dirTemplate, quiet,
                                show_progress_bar):
        assert dirTemplate is None
        (uid,) = seriesInstanceUID
        self.calls.append(uid)
        with tempfile.NamedTemporaryFile("w", delete=False) as manifest:
            manifest.write(f"cp s3://bucket/{uid}/* {downloadDir}")
        self.leftovers.append(Path(manifest.name))
        for i in range(self.files_of[uid]):
            (Path(downloadDir) / f"{i}.dcm").write_bytes(b"DICM")
        logging.getLogger("idc_index.index").error(
            "Download process failed with the following errors:\nERROR \"cp s3://bucket\": no such host")


@pytest.fixture
def fake_idc(monkeypatch):
    FakeClient.files_of, FakeClient.calls, FakeClient.leftovers = {}, [], []
    monkeypatch.setattr(idc_index, "IDCClient", FakeClient)
    monkeypatch.setattr(idc, "_check_network", lambda host: None)
    return FakeClient


def entry(patient: str, uid: str, n_files: int) -> SeriesEntry:
    return SeriesEntry(patient, uid, f"study-{patient}", n_files, 0.5)


def test_download_places_complete_series_and_resumes(tmp_path, fake_idc):
    series = [entry("P1", "1.1", 3), entry("P2", "2.1", 2)]
    fake_idc.files_of = {"1.1": 3, "2.1": 2}
    paths = download_lidc(tmp_path, series, progress=False)
    assert paths == [tmp_path / "P1/study-P1/1.1", tmp_path / "P2/study-P2/2.1"]
    assert [len(list(p.glob("*.dcm"))) for p in paths] == [3, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P1", "P2"]
    assert fake_idc.leftovers and not any(p.exists() for p in fake_idc.leftovers)

    assert download_lidc(tmp_path, series, progress=False) == paths
    assert fake_idc.calls == ["1.1", "2.1"]  # the rerun fetched nothing


def test_incomplete_download_leaves_nothing_and_says_why(tmp_path, fake_idc):
    fake_idc.files_of = {"1.1": 3, "2.1": 1}
    with pytest.raises(DownloadError) as info:
        download_lidc(tmp_path, [entry("P1", "1.1", 3), entry("P2", "2.1", 4)], progress=False)
    message = str(info.value)
    assert "series 2.1 of P2 came with 1 of 4 files" in message and "no such host" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P1"]  # the complete series stays
    assert not any(p.exists() for p in fake_idc.leftovers)


def test_an_incomplete_series_on_disk_is_fetched_again(tmp_path, fake_idc):
    stale = tmp_path / "P1/study-P1/1.1"
    stale.mkdir(parents=True)
    (stale / "old.dcm").write_bytes(b"DICM")
    fake_idc.files_of = {"1.1": 2}
    download_lidc(tmp_path, [entry("P1", "1.1", 2)], progress=False)
    assert sorted(p.name for p in stale.iterdir()) == ["0.dcm", "1.dcm"]
