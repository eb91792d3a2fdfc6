"""`textrefiner-data`: download and lay out the benchmark datasets in CoOp's folder structure.

Everything known about a dataset (folder name, archives, split file on Google Drive, what goes
where) lives in the `DATASETS` table; the functions below only download, extract and verify.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from textrefiner.data.folder import FOLDER_DATASET, summarize_folder
from textrefiner.errors import OutputError, UserError, describe_os_error

CHUNK = 1 << 20
TIMEOUT_S = 60
DRIVE_VIEW = "https://drive.google.com/file/d/{}/view"


class DownloadError(UserError):
    """A file could not be fetched or failed its integrity check."""


class ArchiveError(UserError):
    """An archive tries to write outside its target folder or lacks an expected entry."""


class CorruptArchiveError(ArchiveError):
    """An archive cannot be read to the end."""


@dataclass(frozen=True)
class Remote:
    """One file to fetch: from a plain URL or from Google Drive (by file id)."""

    filename: str
    url: str = ""
    drive_id: str = ""
    md5: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class Archive:
    """An archive plus where its contents go.

    `moves`: (path inside the extracted tree, destination inside the dataset folder); a
    destination of "." merges that path's children into the dataset folder.
    `inner`: archives inside this archive (paths in the extracted tree) to unpack in place first.
    """

    remote: Remote
    moves: tuple[tuple[str, str], ...]
    inner: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    folder: str
    archives: tuple[Archive, ...] = ()
    files: tuple[Remote, ...] = ()  # stored as-is in the dataset folder (split and label files)
    expect: tuple[str, ...] = ()  # must exist and be non-empty once prepared
    manual: str = ""  # set when the images need a manual download; says how


def _split(name: str, drive_id: str) -> Remote:
    return Remote(f"split_zhou_{name}.json", drive_id=drive_id)


IMAGENET_CLASSNAMES = Remote("classnames.txt", drive_id="1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF")
VGG = "https://www.robots.ox.ac.uk/~vgg/data"
CARS = "http://ai.stanford.edu/~jkrause/car196"

DATASETS: dict[str, DatasetSpec] = {
    "imagenet": DatasetSpec(
        folder="imagenet",
        files=(IMAGENET_CLASSNAMES,),
        expect=("images/train", "images/val", "classnames.txt"),
        manual=(
            "ImageNet needs a login: download ILSVRC2012 train and val from https://image-net.org, "
            "then extract them to {folder}/images/train and {folder}/images/val "
            "(1,000 folders n01440764, ... in each), or symlink an existing copy there."
        ),
    ),
    "caltech101": DatasetSpec(
        folder="caltech-101",
        archives=(
            Archive(
                Remote(
                    "caltech-101.zip",
                    url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                    md5="3138e1922a9193bfa496528edbbc45d0",
                ),
                moves=(("101_ObjectCategories", "101_ObjectCategories"),),
                inner=("caltech-101/101_ObjectCategories.tar.gz",),
            ),
        ),
        files=(_split("Caltech101", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"),),
        expect=("101_ObjectCategories", "split_zhou_Caltech101.json"),
    ),
    "oxford_pets": DatasetSpec(
        folder="oxford_pets",
        archives=(
            Archive(
                Remote(
                    "images.tar.gz",
                    url=f"{VGG}/pets/data/images.tar.gz",
                    md5="5c4f3ee8e5d25df40f4fd59a7f44e54c",
                ),
                moves=(("images", "images"),),
            ),
            Archive(
                Remote(
                    "annotations.tar.gz",
                    url=f"{VGG}/pets/data/annotations.tar.gz",
                    md5="95a8c909bbe2e81eed6a22bccdf3f68f",
                ),
                moves=(("annotations", "annotations"),),
            ),
        ),
        files=(_split("OxfordPets", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),),
        expect=("images", "annotations", "split_zhou_OxfordPets.json"),
    ),
    "stanford_cars": DatasetSpec(
        folder="stanford_cars",
        archives=(
            Archive(Remote("cars_train.tgz", url=f"{CARS}/cars_train.tgz"), moves=(("cars_train", "cars_train"),)),
            Archive(Remote("cars_test.tgz", url=f"{CARS}/cars_test.tgz"), moves=(("cars_test", "cars_test"),)),
            Archive(
                Remote("car_devkit.tgz", url="https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz"),
                moves=(("devkit", "devkit"),),
            ),
        ),
        files=(
            Remote("cars_test_annos_withlabels.mat", url=f"{CARS}/cars_test_annos_withlabels.mat"),
            _split("StanfordCars", "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),
        ),
        expect=("cars_train", "cars_test", "devkit", "cars_test_annos_withlabels.mat", "split_zhou_StanfordCars.json"),
    ),
    "oxford_flowers": DatasetSpec(
        folder="oxford_flowers",
        archives=(
            Archive(
                Remote(
                    "102flowers.tgz",
                    url=f"{VGG}/flowers/102/102flowers.tgz",
                    md5="52808999861908f626f3c1f4e79d11fa",
                ),
                moves=(("jpg", "jpg"),),
            ),
        ),
        files=(
            Remote(
                "imagelabels.mat",
                url=f"{VGG}/flowers/102/imagelabels.mat",
                md5="e0620be6f572b9609742df49c70aed4d",
            ),
            Remote("cat_to_name.json", drive_id="1AkcxCXeK_RCGCEC_GvmWxjcjaNhu-at0"),
            _split("OxfordFlowers", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
        ),
        expect=("jpg", "imagelabels.mat", "cat_to_name.json", "split_zhou_OxfordFlowers.json"),
    ),
    "food101": DatasetSpec(
        folder="food-101",
        archives=(
            Archive(
                Remote(
                    "food-101.tar.gz",
                    url="http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                    md5="85eeb15f3717b99a5da872d97d918f87",
                ),
                moves=(("food-101", "."),),
            ),
        ),
        files=(_split("Food101", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),),
        expect=("images", "meta", "split_zhou_Food101.json"),
    ),
    "fgvc_aircraft": DatasetSpec(
        folder="fgvc_aircraft",
        archives=(
            Archive(
                Remote("fgvc-aircraft-2013b.tar.gz", url=f"{VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"),
                moves=(("fgvc-aircraft-2013b/data", "."),),
            ),
        ),
        expect=("images", "variants.txt", "images_variant_test.txt"),
    ),
    "sun397": DatasetSpec(
        folder="sun397",
        archives=(
            Archive(
                Remote(
                    "SUN397.tar.gz",
                    url="http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
                    md5="8ca2778205c41d23104230ba66911c7a",
                ),
                moves=(("SUN397", "SUN397"),),
            ),
            Archive(
                Remote("Partitions.zip", url="https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip"),
                moves=((".", "."),),
            ),
        ),
        files=(_split("SUN397", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),),
        expect=("SUN397", "split_zhou_SUN397.json"),
    ),
    "dtd": DatasetSpec(
        folder="dtd",
        archives=(
            Archive(
                Remote(
                    "dtd-r1.0.1.tar.gz",
                    url=f"{VGG}/dtd/download/dtd-r1.0.1.tar.gz",
                    md5="fff73e5086ae6bdbea199a49dfb8a4c1",
                ),
                moves=(("dtd", "."),),
            ),
        ),
        files=(_split("DescribableTextures", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),),
        expect=("images", "labels", "split_zhou_DescribableTextures.json"),
    ),
    "eurosat": DatasetSpec(
        folder="eurosat",
        archives=(
            Archive(
                Remote(
                    "EuroSAT.zip",
                    url=(
                        "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                        "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip"
                    ),
                    md5="c8fa014336c82ac7804f0398fcb19387",
                ),
                moves=(("2750", "2750"),),
            ),
        ),
        files=(_split("EuroSAT", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),),
        expect=("2750", "split_zhou_EuroSAT.json"),
    ),
    "ucf101": DatasetSpec(
        folder="ucf101",
        archives=(
            Archive(
                Remote("UCF-101-midframes.zip", drive_id="10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),
                moves=(("UCF-101-midframes", "UCF-101-midframes"),),
            ),
        ),
        files=(_split("UCF101", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),),
        expect=("UCF-101-midframes", "split_zhou_UCF101.json"),
    ),
    "imagenetv2": DatasetSpec(
        folder="imagenetv2",
        archives=(
            Archive(
                Remote(
                    "imagenetv2-matched-frequency.tar.gz",
                    url="https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz",
                ),
                moves=(("imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency-format-val"),),
            ),
        ),
        files=(IMAGENET_CLASSNAMES,),
        expect=("imagenetv2-matched-frequency-format-val", "classnames.txt"),
    ),
    "imagenet_sketch": DatasetSpec(
        folder="imagenet-sketch",
        files=(IMAGENET_CLASSNAMES,),
        expect=("images", "classnames.txt"),
        manual=(
            "ImageNet-Sketch has no stable direct archive: download it from "
            "https://github.com/HaohanWang/ImageNet-Sketch (links in its README) and extract it so "
            "that {folder}/images holds the 1,000 class folders n01440764, ..."
        ),
    ),
    "imagenet_a": DatasetSpec(
        folder="imagenet-adversarial",
        archives=(
            Archive(
                Remote("imagenet-a.tar", url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar"),
                moves=(("imagenet-a", "imagenet-a"),),
            ),
        ),
        files=(IMAGENET_CLASSNAMES,),
        expect=("imagenet-a", "classnames.txt"),
    ),
    "imagenet_r": DatasetSpec(
        folder="imagenet-rendition",
        archives=(
            Archive(
                Remote("imagenet-r.tar", url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"),
                moves=(("imagenet-r", "imagenet-r"),),
            ),
        ),
        files=(IMAGENET_CLASSNAMES,),
        expect=("imagenet-r", "classnames.txt"),
    ),
}


@dataclass
class Sources:
    """Where files come from: per-dataset base URLs and a base URL for Drive-hosted files."""

    base_urls: dict[str, str] = field(default_factory=dict)
    split_base_url: str = ""

    def locate(self, dataset: str, remote: Remote, is_archive: bool) -> tuple[str, str]:
        """('http', url) or ('drive', id) for `remote`."""
        base = self.base_urls.get(dataset)
        if remote.drive_id and not is_archive:
            if self.split_base_url:
                return "http", f"{self.split_base_url.rstrip('/')}/{remote.filename}"
            return "drive", remote.drive_id
        if base:
            return "http", f"{base.rstrip('/')}/{remote.filename}"
        if remote.url:
            return "http", remote.url
        return "drive", remote.drive_id


# ----------------------------------------------------------------------------- download


def _progress(total: int | None, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


def _open(url: str, start: int):
    headers = {"User-Agent": "textrefiner-data"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:
            return None  # nothing left to send: the partial file is already complete
        raise DownloadError(f"{url} answered HTTP {err.code} ({err.reason}). If the file moved, "
                            "point --base-url at a mirror.") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"Could not reach {url} ({reason}). Check the network connection, "
                            "or pass --base-url NAME=URL to use a mirror.") from None


def _content_range(resp, start: int) -> int | None:
    """Total size if the server resumed at `start`; raises ValueError if it resumed elsewhere."""
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != start:
        raise ValueError("unexpected Content-Range")
    return None if match.group(2) == "*" else int(match.group(2))


def check_digest(path: Path, md5: str = "", sha256: str = "") -> None:
    """Raise DownloadError if `path` does not match the known md5/sha256 (when given)."""
    for algo, expected in (("md5", md5), ("sha256", sha256)):
        if not expected:
            continue
        digest = hashlib.new(algo)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected.lower():
            raise DownloadError(f"{algo} checksum mismatch for {path.name}: expected {expected}, "
                                f"got {digest.hexdigest()}. The file was removed; run the command again, "
                                "and if it fails again the source has changed (try another --base-url).")


def download(url: str, dest: Path, md5: str = "", sha256: str = "") -> Path:
    """Fetch `url` to `dest` through `dest.part`, resuming a partial file with an HTTP Range request."""
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    resp = _open(url, start)
    if resp is not None:
        with resp:
            resumed = start > 0 and resp.status == 206
            if resumed:
                try:
                    total = _content_range(resp, start)
                except ValueError:
                    resumed = False
            if start and not resumed:
                part.unlink()  # the server cannot resume here: start over with a plain request
                return download(url, dest, md5, sha256)
            if not resumed:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            _stream(resp, part, start, total, url)
        size = part.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"Download of {dest.name} stopped at {size:,} of {total:,} bytes. "
                                "Run the command again to resume it.")
    try:
        check_digest(part, md5, sha256)
    except DownloadError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest


def _stream(resp, part: Path, start: int, total: int | None, url: str) -> None:
    with open(part, "ab" if start else "wb") as out, _progress(total, start, part.name[:-5]) as bar:
        try:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                try:
                    out.write(chunk)
                except OSError as err:  # the local disk, not the download, failed
                    raise OutputError(f"Could not write {part}: {err.strerror or err}. The "
                                      f"{out.tell():,} bytes downloaded so far are kept: free disk "
                                      "space, then run the command again to resume.") from None
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise DownloadError(f"Download from {url} was interrupted ({err!r}). Run the command again "
                                "to resume it.") from None


def download_drive(drive_id: str, dest: Path) -> Path:
    """Fetch a Google Drive file with gdown."""
    try:
        import gdown
    except ImportError:
        raise UserError("Fetching files from Google Drive needs gdown: pip install gdown") from None
    try:
        result = gdown.download(id=drive_id, output=str(dest), quiet=False, resume=True)
    except Exception as err:  # gdown raises several unrelated types for network/quota problems
        result, reason = None, err
    else:
        reason = "no file returned"
    if not result or not dest.exists() or dest.stat().st_size == 0:
        raise DownloadError(f"Could not fetch {dest.name} from Google Drive ({reason}). Download it by "
                            f"hand from {DRIVE_VIEW.format(drive_id)} and save it as {dest}.")
    return dest


def fetch(where: tuple[str, str], dest: Path, remote: Remote) -> Path:
    """Download `remote` to `dest` unless a verified copy is already there."""
    if dest.exists() and dest.stat().st_size > 0:
        try:
            check_digest(dest, remote.md5, remote.sha256)
            return dest
        except DownloadError:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    kind, location = where
    if kind == "drive":
        download_drive(location, dest)
        check_digest(dest, remote.md5, remote.sha256)
        return dest
    return download(location, dest, remote.md5, remote.sha256)


# ----------------------------------------------------------------------------- extract


def _inside(root: Path, name: str) -> bool:
    target = (root / name).resolve()
    return target == root or root in target.parents


def _safe_tar_members(tar: tarfile.TarFile, root: Path):
    for member in tar.getmembers():
        if not _inside(root, member.name):
            raise ArchiveError(f"Archive entry {member.name!r} points outside the target folder; refusing it.")
        if member.issym() or member.islnk():
            link_base = (root / member.name).parent if member.issym() else root
            if not _inside(root, str(link_base / member.linkname)):
                raise ArchiveError(f"Archive link {member.name!r} -> {member.linkname!r} leaves the target folder.")
        elif not (member.isfile() or member.isdir()):
            continue  # devices, fifos: never needed for image datasets
        yield member


def extract(archive: Path, into: Path) -> None:
    """Unpack a tar (any compression) or zip archive into `into`, refusing paths that escape it."""
    root = into.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if not _inside(root, name):
                        raise ArchiveError(f"Archive entry {name!r} points outside the target folder; refusing it.")
                zf.extractall(root)
        else:
            with tarfile.open(archive) as tar:
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(root, members=list(_safe_tar_members(tar, root)), **kwargs)
    except ArchiveError:
        raise
    except OSError as err:
        if err.errno is not None:  # writing the files failed (disk full, permissions): keep it
            raise OutputError(f"Could not extract {archive.name}: {describe_os_error(err)}. The "
                              "archive is kept: free disk space (or fix the folder's permissions), "
                              "then run the command again.") from None
        raise CorruptArchiveError(f"{archive.name} is corrupt or incomplete ({err}).") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise CorruptArchiveError(f"{archive.name} is corrupt or incomplete ({err}).") from None


def _move(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))


EXTRACT_PREFIX = ".extract-"


def remove_stale_extractions(folder: Path, log=print) -> None:
    """Delete the temporary folders of extractions whose process is gone (a killed run leaves
    them behind, and they can be as large as the dataset)."""
    for stale in folder.glob(EXTRACT_PREFIX + "*"):
        pid = stale.name[len(EXTRACT_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        log(f"removing {stale}, left by an interrupted extraction")
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def install_archive(archive: Archive, path: Path, folder: Path) -> None:
    """Extract `path` in a temporary folder next to `folder`, then move the wanted parts in place."""
    prefix = f"{EXTRACT_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=folder) as tmp:
        tmp_root = Path(tmp)
        extract(path, tmp_root)
        for inner in archive.inner:
            inner_path = tmp_root / inner
            if not inner_path.is_file():
                raise ArchiveError(f"{path.name} does not contain {inner}; the archive layout has changed.")
            extract(inner_path, tmp_root)
            inner_path.unlink()
        for src_name, dst_name in archive.moves:
            src = tmp_root / src_name
            if not src.exists():
                raise ArchiveError(f"{path.name} does not contain {src_name!r}; the archive layout has changed.")
            if dst_name == ".":
                for child in list(src.iterdir()):
                    _move(child, folder / child.name)
            else:
                _move(src, folder / dst_name)


def _marker(archive: Archive, folder: Path) -> Path:
    """Written once an archive is fully in place, so a re-run skips it."""
    return folder / f".done-{archive.remote.filename}"


# ----------------------------------------------------------------------------- verify / driver


def _non_empty(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.is_file() and path.stat().st_size > 0


def missing_paths(name: str, root: Path) -> list[str]:
    """Expected paths of dataset `name` under `root` that are absent or empty."""
    spec = DATASETS[name]
    folder = root / spec.folder
    return [p for p in spec.expect if not _non_empty(folder / p)]


def verify(name: str, root: Path) -> None:
    missing = missing_paths(name, root)
    if missing:
        folder = root / DATASETS[name].folder
        raise UserError(f"{name}: preparation incomplete, missing or empty in {folder}: {', '.join(missing)}.")


def prepare(name: str, root: Path, sources: Sources, keep_archives: bool = False, log=print) -> bool:
    """Prepare one dataset. Returns True when it is complete, False when manual steps remain."""
    spec = DATASETS[name]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_extractions(folder, log)
    for remote in spec.files:
        fetch(sources.locate(name, remote, is_archive=False), folder / remote.filename, remote)
    for archive in spec.archives:
        if _marker(archive, folder).exists():
            log(f"{name}: {archive.remote.filename} already extracted, skipping")
            continue
        path = fetch(sources.locate(name, archive.remote, is_archive=True), folder / archive.remote.filename,
                     archive.remote)
        log(f"{name}: extracting {path.name}")
        try:
            install_archive(archive, path, folder)
        except CorruptArchiveError as err:
            path.unlink()
            raise CorruptArchiveError(f"{err} It was removed; run the command again to download it afresh.") from None
        _marker(archive, folder).touch()
        if not keep_archives:
            path.unlink()
    if spec.manual and missing_paths(name, root):
        log(f"{name}: manual step needed.\n  " + spec.manual.format(folder=folder))
        return False
    verify(name, root)
    log(f"{name}: ready in {folder}")
    return True


def _parse_base_urls(items: list[str]) -> dict[str, str]:
    urls = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not url or name not in DATASETS:
            raise UserError(f"--base-url expects NAME=URL with NAME one of: {', '.join(DATASETS)} (got {item!r}).")
        urls[name] = url
    return urls


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textrefiner-data",
        description="Download and prepare datasets in CoOp's folder layout.",
    )
    parser.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}, or 'all'; or "
                        "ImageFolder: check the folder of your own images that --root names, "
                        "write its split and list its classes")
    parser.add_argument("--root", required=True, type=Path, help="folder that holds all datasets")
    parser.add_argument("--base-url", action="append", default=[], metavar="NAME=URL",
                        help="fetch dataset NAME's archives and files from URL/<filename> (a mirror)")
    parser.add_argument("--split-base-url", default="", metavar="URL",
                        help="fetch split and other Google-Drive-hosted files from URL/<filename>")
    parser.add_argument("--keep-archives", action="store_true", help="keep archives after extraction")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dataset == FOLDER_DATASET:
            summarize_folder(str(args.root))
            return 0
        if args.dataset != "all" and args.dataset not in DATASETS:
            raise UserError(f"Unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}, or 'all'.")
        sources = Sources(_parse_base_urls(args.base_url), args.split_base_url)
        names = list(DATASETS) if args.dataset == "all" else [args.dataset]
        failed, manual = [], []
        for name in names:
            try:
                if not prepare(name, args.root, sources, args.keep_archives):
                    manual.append(name)
            except UserError as err:
                if len(names) == 1:
                    raise
                print(f"error: {err}", file=sys.stderr)
                failed.append(name)
        if manual:
            print(f"Manual steps remain for: {', '.join(manual)} (see above).")
        if failed:
            raise UserError(f"Failed to prepare: {', '.join(failed)} (see the errors above).")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. --root in a read-only place
        print(f"error: {describe_os_error(err)}. Fix the folder (permissions, free space), then "
              "run the command again: finished parts are kept.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
