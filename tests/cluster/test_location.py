"""One Location for local paths and object URLs: every operation the stages use behaves the same on a local folder
and on a bucket of a real S3-compatible server (moto on 127.0.0.1), and the naming arithmetic holds for any key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segpipe.core.errors import InputError, OutputError
from segpipe.core.files import atomic_output
from segpipe.core.location import Location
from segpipe.core.objects import head
from tests.cluster.conftest import S3Server

PART = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@given(bucket=st.from_regex(r"[a-z][a-z0-9-]{2,10}", fullmatch=True), parts=st.lists(PART, min_size=1, max_size=5))
def test_an_object_url_names_like_a_path(bucket: str, parts: list[str]) -> None:
    url = Location(f"s3://{bucket}/{'/'.join(parts)}")
    path = Location("/data/" + "/".join(parts))
    for place in (url, path):
        assert place.name == parts[-1]
        assert place.parent.child(place.name) == place
        assert place.beside("x.json") == place.parent.child("x.json")
        assert Location(str(place)) == place and place.same_as(Location(str(place)))
    assert str(url) == f"s3://{bucket}/{'/'.join(parts)}" and not url.is_local and path.is_local
    assert Location(f"s3://{bucket}/{'/'.join(parts)}/") == url, "a prefix and a folder are the same place"


def test_a_file_must_stay_beside_its_anchor(tmp_path: Path) -> None:
    out = Location(tmp_path / "mask.tif")
    Location(tmp_path / "p.tif").check_beside(out, "--probabilities")
    with pytest.raises(OutputError, match=r"resolves to .*, outside the directory of OUTPUT"):
        Location(tmp_path / ".." / "p.tif").check_beside(out, "--probabilities")
    remote = Location("s3://b/x/mask.tif")
    Location("s3://b/x/p.tif").check_beside(remote, "--probabilities")
    for elsewhere in ("s3://b/y/p.tif", "s3://other/x/p.tif", str(tmp_path / "p.tif")):
        with pytest.raises(OutputError, match="is not beside OUTPUT"):
            Location(elsewhere).check_beside(remote, "--probabilities")


@pytest.fixture(params=["local", "s3"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Location]:
    """An empty folder: a local one, or a prefix of a fresh bucket on a real S3 server."""
    if request.param == "local":
        yield Location(tmp_path / "out")
        return
    s3: S3Server = request.getfixturevalue("s3")
    yield Location(s3.bucket("out")).child("night")


def test_the_same_operations_on_a_folder_and_a_bucket(folder: Location, tmp_path: Path) -> None:
    folder.make_folder()
    folder.check_folder("--work-dir")
    item = folder.child("a.item.json")
    assert not item.exists() and item.read_json() is None
    item.write_json({"id": "a", "token": "s3://u:secret@host/x"})
    assert item.exists() and item.read_json() == {"id": "a", "token": "s3://u:***@host/x"}, "secrets redacted"
    folder.child("b.item.json").write_atomically(b'{"id": "b"}')
    folder.child("nested").child("c.item.json").write_atomically(b"{}")
    folder.child("notes.txt").write_atomically("not an item")
    assert [p.name for p in folder.list(".item.json")] == ["a.item.json", "b.item.json"]
    assert [p.name for p in folder.list(".item.json", recursive=True)] == ["a.item.json", "b.item.json", "c.item.json"]
    with folder.child("notes.txt").open() as f:
        assert f.read() == b"not an item"
    item.remove()
    item.remove()  # nothing there: nothing happens
    assert not item.exists()
    with pytest.raises(InputError):
        item.read_bytes()


def test_a_file_appears_only_when_complete(folder: Location, tmp_path: Path) -> None:
    folder.make_folder()
    target = folder.child("mask.tif")
    target.check_writable_file("output", overwrite=False)
    with target.upload_when_complete(tmp_path / "scratch.tif") as local, atomic_output(local) as tmp:
        tmp.write_bytes(b"complete")  # builders write atomically: locally the target is the file itself
    assert target.read_bytes() == b"complete" and not (tmp_path / "scratch.tif").exists()
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        target.check_writable_file("output", overwrite=False)
    broken = folder.child("broken.tif")
    with (
        pytest.raises(RuntimeError),
        broken.upload_when_complete(tmp_path / "scratch.tif") as local,
        atomic_output(local) as tmp,
    ):
        tmp.write_bytes(b"half")
        raise RuntimeError("the build failed")
    assert not broken.exists() and not (tmp_path / "scratch.tif").exists()


def test_one_writer_at_a_time(folder: Location) -> None:
    target = folder.child("mask.tif")
    with target.lock("output"), pytest.raises(OutputError, match="in use by another segpipe run"), target.lock("o"):
        pass
    with target.lock("output"):  # released: taken again
        pass


def test_a_missing_bucket_is_refused_before_any_work(s3: S3Server) -> None:
    with pytest.raises(OutputError, match="cannot write to --work-dir 's3://nobucket/work'"):
        Location("s3://nobucket/work").check_folder("--work-dir")
    with pytest.raises(OutputError, match=r"cannot write output 's3://nobucket/mask\.tif'"):
        Location("s3://nobucket/mask.tif").check_writable_file("output", overwrite=False)
    assert head("s3://nobucket/mask.tif") is None
