"""Session uploads through the real server (``PUT /session/``): archives whose members would land outside
the session folder (tar slip) are refused whole with a 400 naming the member; good archives and plain films
still make sessions."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import SAMPLE
from server import Server, copy_studies

FILM = (SAMPLE / "images" / "chest_000.png").read_bytes()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    studies = copy_studies(root / "studies", ["chest_000.png"])
    outside = root / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me")
    sessions, tmp = root / "sessions", root / "tmp"
    tmp.mkdir()
    srv = Server(studies, conf={"adapter_dir": str(root / "adapters"), "auto_train_after": "0", "refine": "false"},
                 env={"MONAI_LABEL_SESSION_PATH": str(sessions), "TMPDIR": str(tmp)}, log=root / "server.log")
    try:
        srv.info = srv.wait_ready()
        yield {"server": srv, "root": root, "outside": outside, "sessions": sessions, "tmp": tmp}
    finally:
        srv.stop()


def _climb(target: Path) -> str:
    """A relative name that climbs from any folder to ``target``."""
    return "../" * 30 + str(target).lstrip("/")


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def tar_device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


def zip_bytes(members: list[tuple[str, bytes]], symlink: tuple[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data)
        if symlink:
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, symlink[1])
    return buf.getvalue()


def put_session(srv: Server, name: str, content: bytes, uncompress: bool = True):
    return srv.client.put("/session/", params={"uncompress": str(uncompress).lower()},
                          files={"files": (name, content)})


def _hostile(x: dict) -> dict[str, tuple[str, bytes, str]]:
    """id -> (upload name, bytes, the member the 400 must name)."""
    out = x["outside"]
    rel, absolute = _climb(out / "SLIP_rel.txt"), str(out / "SLIP_abs.txt")
    return {
        "tar-relative": ("a.tar", tar_bytes([("ok.txt", b"x"), (rel, b"slip")]), rel),
        "tar-absolute": ("a.tar", tar_bytes([(absolute, b"slip")]), absolute),
        "tgz-relative": ("a.tar.gz", tar_bytes([(rel, b"slip")], "w:gz"), rel),
        "tar-symlink-out": ("a.tar", tar_bytes([tar_link("d", str(out)), ("d/SLIP_link.txt", b"slip")]), "d"),
        "tar-symlink-climb": ("a.tar", tar_bytes([tar_link("up", "../../../../../../../../../../")]), "up"),
        "tar-hardlink-out": ("a.tar", tar_bytes([tar_link("h", str(out / "victim.txt"), tarfile.LNKTYPE)]), "h"),
        "tar-device": ("a.tar", tar_bytes([tar_device("null")]), "null"),
        "zip-relative": ("a.zip", zip_bytes([("ok.txt", b"x"), (rel, b"slip")]), rel),
        "zip-absolute": ("a.zip", zip_bytes([(absolute, b"slip")]), absolute),
        "zip-backslash": ("a.zip", zip_bytes([("..\\..\\SLIP_bs.txt", b"slip")]), "..\\..\\SLIP_bs.txt"),
        "zip-symlink": ("a.zip", zip_bytes([], symlink=("l", str(out))), "l"),
        "not-an-archive": ("a.tar", b"this is not an archive at all" * 20, "a.tar"),
    }


CASES = ["tar-relative", "tar-absolute", "tgz-relative", "tar-symlink-out", "tar-symlink-climb", "tar-hardlink-out",
         "tar-device", "zip-relative", "zip-absolute", "zip-backslash", "zip-symlink", "not-an-archive"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_archive_is_refused_and_writes_nothing(ctx, case):
    srv = ctx["server"]
    name, content, member = _hostile(ctx)[case]
    before = sorted(p.name for p in ctx["sessions"].glob("*")) if ctx["sessions"].is_dir() else []
    temp_before = sorted(ctx["tmp"].rglob("*"))
    r = put_session(srv, name, content)
    assert r.status_code == 400, f"{case}: {r.status_code} {r.text[:300]}"
    assert repr(member[:200]) in r.json()["detail"], r.text
    assert sorted(p.name for p in ctx["outside"].iterdir()) == ["victim.txt"], "a member was written outside"
    assert (ctx["outside"] / "victim.txt").read_text() == "keep me"
    after = sorted(p.name for p in ctx["sessions"].glob("*")) if ctx["sessions"].is_dir() else []
    assert after == before, "a refused archive left a session"
    assert sorted(ctx["tmp"].rglob("*")) == temp_before, "a refused archive left files in the server's temp folder"
    assert srv.client.get("/info/").status_code == 200


def test_nothing_was_written_anywhere_outside(ctx):
    """After the hostile table: no SLIP file anywhere under the test's folders (the server's temp folder too)."""
    assert not list(ctx["root"].rglob("SLIP*"))


@pytest.mark.parametrize("name,content", [
    ("films.tar.gz", tar_bytes([("films/chest.png", FILM), ("films/notes.txt", b"two films")], "w:gz")),
    ("films.zip", zip_bytes([("films/chest.png", FILM), ("films/notes.txt", b"two films")])),
])
def test_a_well_formed_archive_makes_a_session(ctx, name, content):
    srv = ctx["server"]
    r = put_session(srv, name, content)
    assert r.status_code == 200, r.text
    info = r.json()["session_info"]
    folder = Path(info["path"])
    assert folder.parent == ctx["sessions"]
    unpacked = Path(info["image"])
    assert (unpacked / "films" / "chest.png").read_bytes() == FILM
    assert srv.client.get(f"/session/{r.json()['session_id']}").status_code == 200
    assert srv.client.delete(f"/session/{r.json()['session_id']}").status_code == 200
    assert not folder.exists()


def test_a_plain_film_session_is_segmented(ctx):
    srv = ctx["server"]
    r = put_session(srv, "chest.png", FILM, uncompress=False)
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    r = srv.client.post("/infer/xray_textseg", params={"session_id": sid, "output": "json"},
                        data={"params": json.dumps({"prompt": "heart"})})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("sid,status", [("%2E%2E", 400), (".hidden", 404), ("..%5C..", 404)])
def test_session_ids_that_are_not_plain_names_are_never_found(ctx, sid, status):
    """A session id names a folder: the sessions' parent (with a meta.info that looks like a session) is
    neither read nor removed (MONAI Label's DELETE removes the folder it finds)."""
    srv = ctx["server"]
    (ctx["sessions"].parent / "meta.info").write_text(json.dumps({"image": str(ctx["sessions"].parent)}))
    try:
        assert srv.client.get(f"/session/{sid}").status_code == status
        assert srv.client.delete(f"/session/{sid}").status_code == status
        assert ctx["sessions"].parent.is_dir() and (ctx["outside"] / "victim.txt").is_file()
    finally:
        (ctx["sessions"].parent / "meta.info").unlink()


@pytest.mark.parametrize("path", ["/proxy/dicom/wado/%2E%2E/%2E%2E/tools/now", "/ohif/%2E%2E", "/session/%2E"])
def test_dot_segments_in_a_path_are_refused(ctx, path):
    r = ctx["server"].client.get(path)
    assert r.status_code == 400 and "'..' segments" in r.text, (path, r.status_code, r.text[:200])
