"""The `packages` corpus: ~50M+ unique tokens of documentation prose and Python source from pinned Debian
(bookworm) packages — no dataset hub, a package registry only; the powered study's corpus.

Why these: the largest natural-language text that installs from a package registry is software
documentation (reST sources of Sphinx docs: Python, the Linux kernel, scikit-learn, pandas, CMake, Sphinx;
Perl's POD; Git's manuals; PostgreSQL's HTML), about 70 MB of text, roughly a third of the tokens. No
registry package ships that much general prose, so the rest is code: the Python source (tests included)
of widely used libraries (SymPy, SciPy, pandas, scikit-learn, Astropy, Django, ...).

`python src/prepare_data.py data=packages out=DIR` (or training with `data=packages`) downloads each .deb
once into $REMOE_CACHE/packages, refuses any whose SHA-256 differs from its pin below, and reads the
files in memory (an .deb is an ar archive holding data.tar.xz; nothing is extracted to disk, nothing is
executed or unpickled). Documents are read in a fixed order (pin order, then path), exact duplicates
(same text, e.g. a page shipped twice) kept once, and files holding an unbroken run of more than
MAX_RUN characters (embedded data blobs) or fewer than MIN_CHARS characters left out. doc_id is
"<package>/<path in the package>", so the held-out split (a hash of doc_id) and the corpus fingerprint
are the same on every machine. The document list is cached as an Arrow dataset beside the archives.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import NamedTuple

from filelock import FileLock

from ..io import remove_leftovers


class Pin(NamedTuple):
    package: str
    kind: str  # what is read: rst (Sphinx _sources), pod, txt, html (-> text), py (Python source)
    size: int
    sha256: str
    url: str


PINS = (
    Pin("cmake-doc", "rst", 2198792, "6e805a758ffed87cc7ea234cf0a7a1bb8ae78b93d8b5783e7fb989a6320f8133",
        "http://deb.debian.org/debian/pool/main/c/cmake/cmake-doc_3.25.1-1_all.deb"),
    Pin("git-doc", "txt", 2153500, "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
        "http://deb.debian.org/debian/pool/main/g/git/git-doc_2.39.5-0%2bdeb12u3_all.deb"),
    Pin("linux-doc-6.1", "rst", 37346428, "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f",
        "http://deb.debian.org/debian-security/pool/updates/main/l/linux/linux-doc-6.1_6.1.192-3_all.deb"),
    Pin("perl-doc", "pod", 7910372, "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8",
        "http://deb.debian.org/debian-security/pool/updates/main/p/perl/perl-doc_5.36.0-7%2bdeb12u4_all.deb"),
    Pin("postgresql-doc-15", "html", 2124920, "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7",
        "http://deb.debian.org/debian-security/pool/updates/main/p/postgresql-15/postgresql-doc-15_15.20-0%2bdeb12u1_all.deb"),
    Pin("python-pandas-doc", "rst", 11879024, "4998405ff6b12432f46594963e95554ade1104705795428396345fca58d853f8",
        "http://deb.debian.org/debian/pool/main/p/pandas/python-pandas-doc_1.5.3%2bdfsg-2_all.deb"),
    Pin("python-sklearn-doc", "rst", 50397484, "4e244556326064e87e7563e3e544c2288d44b5719db2d7b3a85c9a84ae93488d",
        "http://deb.debian.org/debian/pool/main/s/scikit-learn/python-sklearn-doc_1.2.1%2bdfsg-1_all.deb"),
    Pin("python3.11-doc", "rst", 12644000, "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
        "http://deb.debian.org/debian-security/pool/updates/main/p/python3.11/python3.11-doc_3.11.2-6%2bdeb12u9_all.deb"),
    Pin("sphinx-doc", "rst", 2307496, "1da3d08bb3a0bc82a4b8b8109410e223054bf5fb13904557ec8ea869046f65b4",
        "http://deb.debian.org/debian/pool/main/s/sphinx/sphinx-doc_5.3.0-4_all.deb"),
    Pin("python3-astropy", "py", 3456416, "5eaf4902cc15b673a5c761c691760dfff012ed2bfd2c061fba95c5785fcce41d",
        "http://deb.debian.org/debian/pool/main/a/astropy/python3-astropy_5.2.1-2%2bdeb12u1_amd64.deb"),
    Pin("python3-django", "py", 2834388, "9ad8ed29d9026207970777e194f658c39b3a7a96a932967f043503fc25bdc319",
        "http://deb.debian.org/debian-security/pool/updates/main/p/python-django/python3-django_3.2.25-0%2bdeb12u7_all.deb"),
    Pin("python3-docutils", "py", 382132, "ada9a80195375262c50dc0acf21a00a51166fee3fc96f6ca6d20a1a27868ba2c",
        "http://deb.debian.org/debian/pool/main/p/python-docutils/python3-docutils_0.19%2bdfsg-6_all.deb"),
    Pin("python3-matplotlib", "py", 6920692, "9fff6d846b94ddf454f9757efbbc943220686e1347f8ae605fcf86af087bf525",
        "http://deb.debian.org/debian/pool/main/m/matplotlib/python3-matplotlib_3.6.3-1%2bb1_amd64.deb"),
    Pin("python3-networkx", "py", 1424824, "69888603d1b54696f5c3d02d05527628d2d18661d845109a62fe24aff241aa7b",
        "http://deb.debian.org/debian/pool/main/n/networkx/python3-networkx_2.8.8-1_all.deb"),
    Pin("python3-nltk", "py", 1003688, "8b27ee6cdac2aadc54c1322cbcf7f4c0d0a591ef4d25eab8b17f84374a927ac7",
        "http://deb.debian.org/debian/pool/main/n/nltk/python3-nltk_3.8-1_all.deb"),
    Pin("python3-numpy", "py", 4959648, "64c6e18bd85f881328d70071154c2d8b93fd6de2e07855f81fad5e499694ac03",
        "http://deb.debian.org/debian/pool/main/n/numpy/python3-numpy_1.24.2-1%2bdeb12u1_amd64.deb"),
    Pin("python3-pandas", "py", 2885400, "4c530b36c107dcfdcbf2a2bef4008a4667b1833084259c0c40ef7d26b7fec0a5",
        "http://deb.debian.org/debian/pool/main/p/pandas/python3-pandas_1.5.3%2bdfsg-2_all.deb"),
    Pin("python3-pygments", "py", 783128, "405734a57b8d2722d10413c511d9b63ee78bbbdab8b2b689d7295260bc9618a2",
        "http://deb.debian.org/debian/pool/main/p/pygments/python3-pygments_2.14.0%2bdfsg-1_all.deb"),
    Pin("python3-scipy", "py", 15210448, "75175eb18aa9ef6424c69050a751335fe686c24b65bc1773d0769a74a21c869d",
        "http://deb.debian.org/debian/pool/main/s/scipy/python3-scipy_1.10.1-2_amd64.deb"),
    Pin("python3-sklearn", "py", 2102964, "ca0c6be401d14871c7e93cfdd8d1f561595dc65e6e2ad2501d568aee7f7efc58",
        "http://deb.debian.org/debian/pool/main/s/scikit-learn/python3-sklearn_1.2.1%2bdfsg-1_all.deb"),
    Pin("python3-sphinx", "py", 549392, "926b09b1cb4ce93a11dc7dd83e00df770496bd308e47833e553761f854290953",
        "http://deb.debian.org/debian/pool/main/s/sphinx/python3-sphinx_5.3.0-4_all.deb"),
    Pin("python3-sqlalchemy", "py", 1007608, "141f3ed680b5de944c82aff900b1aeb4909a5d17ee0ddd3d697e250b5f765468",
        "http://deb.debian.org/debian/pool/main/s/sqlalchemy/python3-sqlalchemy_1.4.46%2bds1-1_all.deb"),
    Pin("python3-sympy", "py", 4358432, "b437232be31819aafd267ddf2132c16293ef75e02fd58b4ad31eee3ef1d5b49e",
        "http://deb.debian.org/debian/pool/main/s/sympy/python3-sympy_1.11.1-1_all.deb"),
    Pin("python3-twisted", "py", 1983948, "d8194df7c9b8a524ce7d350fcb4c6a734410a2c701f2bfa8c0d3f01864f51f6a",
        "http://deb.debian.org/debian/pool/main/t/twisted/python3-twisted_22.4.0-4%2bdeb12u1_all.deb"),
)
MIN_CHARS = 200
MAX_RUN = 10_000  # characters without whitespace: data, not text (the tokenizer trainer also refuses 100k)
VERSION = 1  # of the reading rules below: part of the cache key


class _Text(HTMLParser):
    """Visible text of an HTML page (script/style dropped)."""

    def __init__(self):
        super().__init__()
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style") and self.skip > 0

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_text(page: str) -> str:
    p = _Text()
    p.feed(page)
    return re.sub(r"\n\s*\n\s*", "\n\n", "".join(p.out)).strip()


def wanted(kind: str, path: str) -> bool:
    if kind == "rst":
        return "/_sources/" in path and path.endswith(".txt")
    if kind == "pod":
        return path.endswith(".pod")
    if kind == "txt":
        return path.endswith(".txt")
    if kind == "html":
        return path.endswith(".html")
    return path.endswith(".py") and "/dist-packages/" in path


def deb_files(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, content) of every regular file in a .deb's data archive, in path order, read in memory."""
    if data[:8] != b"!<arch>\n":
        raise ValueError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        name, size = data[pos : pos + 16].decode().strip().rstrip("/"), int(data[pos + 48 : pos + 58])
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
                for m in members:
                    yield m.name.removeprefix("./"), tar.extractfile(m).read()
            return
    raise ValueError("no data.tar member")


def fetch(pin: Pin, folder: str) -> bytes:
    """The pinned .deb's bytes, downloaded once into `folder`; a wrong hash (download or cache) is refused."""
    path = os.path.join(folder, urllib.parse.unquote(pin.url.rsplit("/", 1)[1]))
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
    else:
        with urllib.request.urlopen(pin.url, timeout=300) as r:
            data = r.read()
    if hashlib.sha256(data).hexdigest() != pin.sha256:
        raise ValueError(f"data: {pin.package}: {pin.url} does not match its pinned SHA-256 (remoe/data/packages.py);"
                         f" delete {path} to download it again" if os.path.exists(path) else
                         f"data: {pin.package}: the download of {pin.url} does not match its pinned SHA-256")
    if not os.path.exists(path):
        tmp = f"{path}.partial-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return data


def documents_of(pin: Pin, data: bytes) -> Iterator[dict]:
    for path, raw in deb_files(data):
        if not wanted(pin.kind, path):
            continue
        text = raw.decode("utf-8", errors="replace")
        if pin.kind == "html":
            text = html_text(text)
        if len(text) < MIN_CHARS or re.search(rf"\S{{{MAX_RUN + 1}}}", text):
            continue
        yield {"text": text, "domain": "code" if pin.kind == "py" else "prose", "source": pin.package,
               "doc_id": f"{pin.package}/{path}"}


def spec_key(pins=PINS) -> str:
    return hashlib.sha256(json.dumps([VERSION, [p._asdict() for p in pins]]).encode()).hexdigest()[:16]


def package_documents(cache_dir: str, pins=PINS):
    """The corpus as a datasets.Dataset (text, domain, source, doc_id), built once per pin set."""
    from datasets import load_from_disk

    folder = os.path.join(cache_dir, "packages")
    out = os.path.join(folder, f"documents-{spec_key(pins)}")
    if os.path.exists(os.path.join(out, "dataset_info.json")):
        return load_from_disk(out)
    os.makedirs(folder, exist_ok=True)
    with FileLock(out + ".lock"):  # runs started together build it once
        if not os.path.exists(os.path.join(out, "dataset_info.json")):
            remove_leftovers(folder, r".*\.partial-(?P<pid>\d+)")
            _build(pins, folder, out)
    return load_from_disk(out)


def _build(pins, folder: str, out: str) -> None:
    from datasets import Dataset

    rows, seen = [], set()
    for pin in pins:
        for doc in documents_of(pin, fetch(pin, folder)):
            digest = hashlib.sha256(doc["text"].encode()).digest()
            if digest not in seen:
                seen.add(digest)
                rows.append(doc)
    ds = Dataset.from_list(rows)
    tmp = f"{out}.partial-{os.getpid()}"
    ds.save_to_disk(tmp)
    os.replace(tmp, out)
    manifest = {"pins": [p._asdict() for p in pins], "documents": len(rows),
                "characters": sum(len(r["text"]) for r in rows),
                "by_package": {p.package: sum(r["source"] == p.package for r in rows) for p in pins}}
    with open(out + ".json", "w") as f:
        json.dump(manifest, f, indent=1)
