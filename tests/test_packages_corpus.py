"""The packages corpus (remoe/data/packages.py), offline: a .deb built here in memory stands in for a pinned
download — files read in memory by kind, HTML to text, exact duplicates once, data blobs and short files
out, ids independent of the machine, a hash mismatch refused, the document list cached and rebuilt the same."""

import hashlib
import io
import tarfile

import pytest

from remoe.data.packages import PINS, Pin, deb_files, html_text, package_documents


def make_deb(files: dict[str, bytes]) -> bytes:
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", b""), (b"data.tar.xz", tar_bytes.getvalue())]
    out = b"!<arch>\n"
    for name, data in members:
        out += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8) \
            + str(len(data)).encode().ljust(10) + b"`\n" + data + (b"\n" if len(data) % 2 else b"")
    return out


PROSE = ("Routing sends each token to a few experts. " * 10).encode()


def pinned(tmp_path, name, kind, files):
    data = make_deb(files)
    (tmp_path / "packages").mkdir(exist_ok=True)
    (tmp_path / "packages" / f"{name}_1_all.deb").write_bytes(data)
    return Pin(name, kind, len(data), hashlib.sha256(data).hexdigest(), f"http://example.invalid/{name}_1_all.deb")


def test_documents_by_kind_deduplicated_and_cached(tmp_path):
    docs = pinned(tmp_path, "some-doc", "rst", {
        "usr/share/doc/x/html/_sources/intro.rst.txt": PROSE,
        "usr/share/doc/x/html/_sources/copy.rst.txt": PROSE,  # the same text again: kept once
        "usr/share/doc/x/html/intro.html": b"<p>not read for kind rst</p>" * 20,
        "usr/share/doc/x/html/_sources/short.rst.txt": b"too short"})
    code = pinned(tmp_path, "python3-lib", "py", {
        "usr/lib/python3/dist-packages/lib/core.py": b"def f(x):\n    return x + 1\n" * 20,
        "usr/lib/python3/dist-packages/lib/blob.py": b"DATA = '" + b"A" * 20_000 + b"'\n",  # a data blob: out
        "usr/share/doc/python3-lib/example.py": b"print('not under dist-packages')\n" * 20})
    web = pinned(tmp_path, "web-doc", "html", {
        "usr/share/doc/w/page.html": b"<html><style>p{}</style><body><p>" + PROSE + b"</p><script>x()</script></body>"})
    ds = package_documents(str(tmp_path), pins=(docs, code, web))
    assert list(ds["doc_id"]) == ["some-doc/usr/share/doc/x/html/_sources/copy.rst.txt",
                                  "python3-lib/usr/lib/python3/dist-packages/lib/core.py",
                                  "web-doc/usr/share/doc/w/page.html"]  # path order within a package
    assert list(ds["domain"]) == ["prose", "code", "prose"] and list(ds["source"]) == [
        "some-doc", "python3-lib", "web-doc"]
    assert ds["text"][2] == PROSE.decode().strip()  # visible text only
    again = package_documents(str(tmp_path), pins=(docs, code, web))  # from the cache
    assert list(again["text"]) == list(ds["text"])


def test_a_package_whose_hash_differs_from_its_pin_is_refused(tmp_path):
    pin = pinned(tmp_path, "some-doc", "rst", {"usr/share/doc/x/_sources/a.txt": PROSE})
    bad = pin._replace(sha256="0" * 64)
    with pytest.raises(ValueError, match="does not match its pinned SHA-256"):
        package_documents(str(tmp_path), pins=(bad,))


def test_deb_reader_refuses_what_is_not_a_deb():
    with pytest.raises(ValueError, match="not a Debian package"):
        list(deb_files(b"PK\x03\x04 a zip"))


def test_every_pin_names_one_debian_archive_and_its_sha256():
    assert len({p.package for p in PINS}) == len(PINS)
    assert all(len(p.sha256) == 64 and p.size > 0 and p.url.startswith("http://deb.debian.org/") for p in PINS)
    assert {p.kind for p in PINS} <= {"rst", "pod", "txt", "html", "py"}
    assert html_text("<p>a</p>\n\n\n<p>b</p>") == "a\n\nb"
