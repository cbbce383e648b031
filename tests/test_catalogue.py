"""Simulated base images and packages: real files of realistic size, the same bytes every time."""

import hashlib
import os

import pytest

from overlaykit import catalogue


def _digest_tree(root):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            h.update(os.path.relpath(p, root).encode())
            h.update(os.readlink(p).encode() if os.path.islink(p) else open(p, "rb").read())
    return h.hexdigest()


@pytest.mark.parametrize("name, low, high, min_files", [
    ("debian:stretch", 95e6, 115e6, 1200),
    ("ubuntu:18.04", 55e6, 70e6, 1100),
    ("alpine:3.8", 3.5e6, 6e6, 150),
    ("busybox", 0.9e6, 1.5e6, 100),
])
def test_base_trees_have_realistic_sizes_on_disk(tmp_path, name, low, high, min_files):
    catalogue.write_entries(catalogue.base_entries(name), tmp_path)
    size, count = catalogue.tree_size(tmp_path)
    assert low <= size <= high
    assert count >= min_files
    assert (tmp_path / "etc/os-release").is_file()


def test_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    catalogue.write_entries(catalogue.base_entries("alpine:3.8"), a)
    catalogue.write_entries(catalogue.base_entries("alpine:3.8"), b)
    assert _digest_tree(a) == _digest_tree(b)


def test_debian_has_a_shell_and_a_dpkg_database(tmp_path):
    catalogue.write_entries(catalogue.base_entries("debian:stretch"), tmp_path)
    assert os.readlink(tmp_path / "bin/sh") == "dash"
    assert (tmp_path / "bin/dash").read_bytes().startswith(catalogue.SIMULATED_MAGIC)
    status = catalogue.parse_dpkg_status((tmp_path / "var/lib/dpkg/status").read_text())
    assert set(status) == set(catalogue.DISTROS["stretch"].base)
    listed = (tmp_path / "var/lib/dpkg/info/coreutils.list").read_text().split()
    assert "/bin/ls" in listed and all((tmp_path / p.lstrip("/")).exists() for p in listed)
    assert not (tmp_path / "usr/bin/gcc").exists() and not (tmp_path / "usr/bin/wget").exists()


def test_busybox_applets_are_hardlinks():
    entries = catalogue.base_entries("busybox")
    links = [e for e in entries if e.kind == "hardlink"]
    assert len(links) > 100 and all(e.target == "/bin/busybox" for e in links)


def test_package_files_add_up_to_installed_size():
    distro = catalogue.DISTROS["stretch"]
    for name in ("gcc-6", "libc6-dev", "make", "wget"):
        pkg = distro.archive[name]
        total = sum(e.size for e in catalogue.package_entries(pkg, distro) if e.kind == "file")
        assert abs(total - pkg.size_kb * 1024) < 1024, name


def test_dependency_closure_follows_depends_and_recommends():
    distro = catalogue.DISTROS["stretch"]
    with_rec = catalogue.dependency_closure(["wget"], distro.archive, distro.base)
    without = catalogue.dependency_closure(["wget"], distro.archive, distro.base, recommends=False)
    assert "ca-certificates" in with_rec and "ca-certificates" not in without
    assert with_rec[-1] == "wget" and with_rec.index("libssl1.1") < with_rec.index("wget")


def test_download_is_a_simulated_tarball_of_the_stated_size():
    url = "http://download.redis.io/releases/redis-5.0.3.tar.gz"
    data = catalogue.download_bytes(url)
    assert len(data) == 1_959_445
    assert catalogue.sim_tarball_name(data) == "redis-5.0.3"
    assert catalogue.sim_tarball_name(b"\x1f\x8b real gzip") is None


def test_unknown_base_names_are_refused():
    with pytest.raises(KeyError, match="no simulated base image"):
        catalogue.base_entries("fedora:29")
    assert catalogue.resolve_name("ubuntu:bionic") == "ubuntu:18.04"


@pytest.mark.parametrize("name", ["busybox", "alpine:3.8", "ubuntu:18.04"])
def test_base_layer_built_in_memory_equals_the_layer_of_the_written_tree(tmp_path, name):
    from overlaykit import ondisk
    from overlaykit.images import Layer
    entries = catalogue.base_entries(name)
    root = tmp_path / "root"
    root.mkdir()
    catalogue.write_entries(entries, root)
    on_disk = Layer.from_dir(root, ondisk.probe(tmp_path), mtime=catalogue.BASE_EPOCH)
    in_memory = Layer.from_entries(catalogue.layer_items(entries, mtime=catalogue.BASE_EPOCH))
    assert [e.tar_name for e in in_memory.entries()] == [e.tar_name for e in on_disk.entries()]
    assert in_memory.diff_id == on_disk.diff_id


def test_big_packages_keep_their_bytes_in_few_files():
    distro = catalogue.DISTROS["stretch"]
    pkg = distro.archive["binutils"]  # 22 MB: hundreds of files at the distro's average file size
    files = [e for e in catalogue.package_entries(pkg, distro) if e.kind == "file"]
    notable = {s.partition(":")[0] for s in pkg.files if "->" not in s}
    generated = [e for e in files if e.path not in notable and "/usr/share/doc/" not in e.path]
    assert len(generated) == catalogue.MAX_GENERATED_FILES
    assert abs(sum(e.size for e in files) - pkg.size_kb * 1024) < 1024
    merged = max(generated, key=lambda e: e.size)
    assert merged.size > 10 * distro.avg_file_kb * 1024  # the rest of the package, in one larger file
