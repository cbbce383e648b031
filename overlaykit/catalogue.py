"""Simulated base images, Debian/Ubuntu packages and downloads, so the lesson's Dockerfiles build offline.

Binder has no Docker and no network, yet the lesson's point is about *sizes*: which layer holds the
compiler, the apt lists, the tarball.  This catalogue describes those things with realistic sizes
(taken from the Debian stretch / Ubuntu bionic archives and the redis 5.0.3 release, rounded) and
writes them as real files of exactly that size, with deterministic pseudo-content, so every number the
lesson prints is measured from files on disk.  Nothing here is a real program: simulated executables
start with ``SIMULATED_MAGIC`` and are run by :mod:`overlaykit.shell`, never by the kernel.

A base image is a set of packages plus the files every distribution has (``/etc/os-release``,
``/etc/passwd``, the dpkg database).  Everything is generated from a seeded ``random.Random`` so that the
same name always produces byte-identical trees (and so identical layer digests).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat as stat_module
from dataclasses import dataclass, field

SIMULATED_MAGIC = b"OVERLAYKIT-SIMULATED\n"
"""First bytes of every generated binary: marks a file the simulated shell may 'run', the kernel may not."""

ARCH_LIB = "/usr/lib/x86_64-linux-gnu"


@dataclass(frozen=True)
class Entry:
    """One filesystem object to create: kind is "file", "dir", "symlink" or "hardlink" (target = existing path)."""

    path: str
    kind: str = "file"
    size: int = 0
    mode: int = 0o644
    target: str | None = None
    data: bytes | None = None  # None: deterministic pseudo-content of `size` bytes

    def content(self) -> bytes:
        if self.data is not None:
            return self.data
        return pseudo_content(self.path, self.size, executable=bool(self.mode & 0o111))


def pseudo_content(key: str, size: int, executable: bool = False) -> bytes:
    """Deterministic bytes of exactly `size`; repeated blocks keep generation fast (sizes are what matter)."""
    head = SIMULATED_MAGIC if executable else b""
    block = hashlib.sha256(key.encode()).digest() * 128  # 4 KiB
    body = block * (max(0, size - len(head)) // len(block) + 1)
    return (head + body)[:size]


# ---------------------------------------------------------------------------------------------------
# Packages

@dataclass(frozen=True)
class Package:
    """A .deb as the simulation sees it: Installed-Size in KiB, dependencies, and its notable files."""

    name: str
    version: str
    size_kb: int
    depends: tuple[str, ...] = ()
    recommends: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # "path", "path:KiB", "path->target"; the rest of size_kb is generated
    priority: str = "optional"


def _pkgs(table: str, files: dict[str, tuple[str, ...]], priority: str) -> dict[str, Package]:
    out = {}
    for line in table.strip().splitlines():
        parts = line.split()
        name, version, size = parts[0], parts[1], int(parts[2])
        deps, recs = (), ()
        for extra in parts[3:]:
            if extra.startswith("+"):
                recs = tuple(extra[1:].split(","))
            else:
                deps = tuple(extra.split(","))
        out[name] = Package(name, version, size, deps, recs, files.get(name, ()), priority)
    return out


# Notable files: the commands the shell looks up on PATH, and the big files that dominate sizes.
_BIN = lambda names, d="/bin": tuple(f"{d}/{n}" for n in names.split())  # noqa: E731
_FILES: dict[str, tuple[str, ...]] = {
    "coreutils": _BIN("cat chmod chown cp date dd df echo false ln ls mkdir mknod mktemp mv pwd readlink rm "
                      "rmdir sleep stty sync touch true uname")
    + _BIN("basename dirname du env head id install md5sum nproc printf sha256sum sort tail tee test "
           "tr wc whoami yes [", "/usr/bin"),
    "dash": ("/bin/dash:115", "/bin/sh->dash"),
    "bash": ("/bin/bash:1072",),
    "tar": ("/bin/tar:417",),
    "gzip": ("/bin/gzip:96", "/bin/gunzip"),
    "sed": ("/bin/sed:110",),
    "grep": ("/bin/grep:206",),
    "findutils": ("/usr/bin/find:236", "/usr/bin/xargs:64"),
    "dpkg": ("/usr/bin/dpkg:289", "/usr/bin/dpkg-query:137"),
    "apt": ("/usr/bin/apt-get:47", "/usr/bin/apt-mark:59", "/usr/bin/apt:15", "/usr/bin/apt-cache:79"),
    "passwd": ("/usr/sbin/useradd:118", "/usr/sbin/groupadd:66", "/usr/sbin/usermod:118"),
    "libc6": ("/lib/x86_64-linux-gnu/libc-2.24.so:1648", "/lib/x86_64-linux-gnu/libc.so.6->libc-2.24.so",
              "/lib/x86_64-linux-gnu/ld-2.24.so:150", "/lib64/ld-linux-x86-64.so.2->/lib/x86_64-linux-gnu/ld-2.24.so"),
    "perl-base": ("/usr/bin/perl:2016",),
    "make": ("/usr/bin/make:224",),
    "wget": ("/usr/bin/wget:445",),
    "curl": ("/usr/bin/curl:219",),
    "gcc": ("/usr/bin/gcc->gcc-6", "/usr/bin/cc->gcc"),
    "gcc-6": ("/usr/bin/gcc-6:908", "/usr/bin/x86_64-linux-gnu-gcc-6->gcc-6",
              "/usr/lib/gcc/x86_64-linux-gnu/6/lto1:18850", "/usr/lib/gcc/x86_64-linux-gnu/6/collect2:280"),
    "cpp-6": ("/usr/bin/cpp-6:908", "/usr/lib/gcc/x86_64-linux-gnu/6/cc1:22100"),
    "binutils": ("/usr/bin/ld.bfd:1716", "/usr/bin/ld->ld.bfd", "/usr/bin/as:1133", "/usr/bin/ar:60",
                 "/usr/bin/objdump:1060", "/usr/bin/strip:900"),
    "libc6-dev": ("/usr/include/stdio.h:30", "/usr/include/stdlib.h:35", "/usr/include/string.h:22",
                  "/usr/lib/x86_64-linux-gnu/libc.a:5131", "/usr/lib/x86_64-linux-gnu/libc.so:1"),
    "libgcc-6-dev": ("/usr/lib/gcc/x86_64-linux-gnu/6/libgcc.a:3330",),
    "ca-certificates": ("/etc/ssl/certs/ca-certificates.crt:200", "/usr/sbin/update-ca-certificates:7"),
    "openssl": ("/usr/bin/openssl:720",),
    "util-linux": ("/bin/more:40", "/usr/bin/setpriv:40"),
    "hostname": ("/bin/hostname:17",),
    "mawk": ("/usr/bin/mawk:120", "/usr/bin/awk->mawk"),
    "gosu": ("/usr/local/bin/gosu:2300",),
}

# name version Installed-Size(KiB) depends +recommends   (Debian stretch, amd64; the debian:stretch image)
_STRETCH_BASE = """
adduser 3.115 849 passwd
apt 1.4.9 3539 libapt-pkg5.0,gpgv,debian-archive-keyring
base-files 9.9+deb9u9 333
base-passwd 3.5.43 229
bash 4.4-5 5798 base-files,dash
bsdutils 1:2.29.2-1 238
coreutils 8.26-3 15103
dash 0.5.8-2.4 204
debconf 1.5.61 558 perl-base
debian-archive-keyring 2017.5 133
debianutils 4.8.1.1 213
diffutils 1:3.5-3 1327
dpkg 1.18.25 6778 tar
e2fslibs 1.43.4-2 449
e2fsprogs 1.43.4-2 3931
findutils 4.6.0+git+20161106-2 1854
gcc-6-base 6.3.0-18+deb9u1 209
gpgv 2.1.18-8~deb9u4 721
grep 2.27-2 1111
gzip 1.6-5+b1 231
hostname 3.18+b1 47
init-system-helpers 1.48 131
libacl1 2.2.52-3+b1 62
libapt-pkg5.0 1.4.9 3080
libattr1 1:2.4.47-2+b2 55
libaudit-common 1:2.6.7-2 30
libaudit1 1:2.6.7-2 150
libblkid1 2.29.2-1 367
libbz2-1.0 1.0.6-8.1 96
libc-bin 2.24-11+deb9u4 3367
libc6 2.24-11+deb9u4 10686
libcap-ng0 0.7.7-3+b1 43
libcomerr2 1.43.4-2 83
libdb5.3 5.3.28-12+deb9u1 1814
libdebconfclient0 0.227 71
libfdisk1 2.29.2-1 455
libgcc1 1:6.3.0-18+deb9u1 108
libgcrypt20 1.7.6-2+deb9u3 1297
libgpg-error0 1.26-2 572
liblz4-1 0.0~r131-2+b1 93
liblzma5 5.2.2-1.2+b1 339
libmount1 2.29.2-1 403
libncursesw5 6.0+20161126-1 347
libpam-modules 1.1.8-3.6 874
libpam-modules-bin 1.1.8-3.6 220
libpam-runtime 1.1.8-3.6 1016
libpam0g 1.1.8-3.6 229
libpcre3 2:8.39-3 668
libselinux1 2.6-3+b3 209
libsemanage-common 2.6-2 37
libsemanage1 2.6-2 293
libsepol1 2.6-2 653
libsmartcols1 2.29.2-1 314
libss2 1.43.4-2 95
libstdc++6 6.3.0-18+deb9u1 2000
libsystemd0 232-25+deb9u11 645
libtinfo5 6.0+20161126-1 478
libudev1 232-25+deb9u11 222
libustr-1.0-1 1.0.4-6 258
libuuid1 2.29.2-1 107
login 1:4.4-4.1 2747
lsb-base 9.20161125 49
mawk 1.3.3-17+b3 183
mount 2.29.2-1 444
multiarch-support 2.24-11+deb9u4 220
ncurses-base 6.0+20161126-1 340
ncurses-bin 6.0+20161126-1 536
passwd 1:4.4-4.1 2478
perl-base 5.24.1-3+deb9u5 7433
sed 4.4-1 799
sensible-utils 0.0.9+deb9u1 62
sysvinit-utils 2.88dsf-59.9 110
tar 1.29b-1.1 2770
tzdata 2019a-0+deb9u1 2807
util-linux 2.29.2-1 3558
zlib1g 1:1.2.8.dfsg-5 156
"""

# Packages in the stretch archive that the lesson installs (and their dependencies).
_STRETCH_ARCHIVE = """
gcc 4:6.3.0-4 5 cpp,gcc-6
gcc-6 6.3.0-18+deb9u1 20459 cpp-6,binutils,libgcc-6-dev,libcc1-0,libisl15,libmpc3,libmpfr4,libgmp10 +libc6-dev
cpp 4:6.3.0-4 71 cpp-6
cpp-6 6.3.0-18+deb9u1 24617 gcc-6-base,libisl15,libmpc3,libmpfr4,libgmp10
binutils 2.28-5 22134
libgcc-6-dev 6.3.0-18+deb9u1 7973 libasan3,liblsan0,libtsan0,libubsan0,libcilkrts5,libmpx2,libquadmath0,libitm1,libatomic1,libgomp1
libasan3 6.3.0-18+deb9u1 2838
liblsan0 6.3.0-18+deb9u1 349
libtsan0 6.3.0-18+deb9u1 1092
libubsan0 6.3.0-18+deb9u1 903
libcilkrts5 6.3.0-18+deb9u1 141
libmpx2 6.3.0-18+deb9u1 53
libquadmath0 6.3.0-18+deb9u1 265
libitm1 6.3.0-18+deb9u1 114
libatomic1 6.3.0-18+deb9u1 42
libgomp1 6.3.0-18+deb9u1 249
libcc1-0 6.3.0-18+deb9u1 100
libisl15 0.18-1 3286
libmpc3 1.0.3-1+b2 148
libmpfr4 3.1.5-1 1244
libgmp10 2:6.1.2+dfsg-1 565
libc6-dev 2.24-11+deb9u4 11244 libc-dev-bin,linux-libc-dev +manpages-dev
libc-dev-bin 2.24-11+deb9u4 793
linux-libc-dev 4.9.168-1 4548
manpages 4.10-2 2459
manpages-dev 4.10-2 3608 manpages
make 4.1-9.1 1238
wget 1.18-5+deb9u3 2871 libpsl5,libidn2-0,libssl1.1 +ca-certificates
libpsl5 0.17.0-3 101 libidn2-0 +publicsuffix
publicsuffix 20190415.1030-0+deb9u1 282
libidn2-0 0.16-1+deb9u1 191 libunistring0
libunistring0 0.9.6+really0.9.3-0.1 1414
libssl1.1 1.1.0j-1~deb9u1 3902
ca-certificates 20161130+nmu1+deb9u1 389 openssl
openssl 1.1.0j-1~deb9u1 1226 libssl1.1
curl 7.52.1-5+deb9u9 346 libcurl3 +ca-certificates
libcurl3 7.52.1-5+deb9u9 647 libssl1.1,libidn2-0,libpsl5
gosu 1.10-1+b2 2300
"""

# Ubuntu bionic's minimised image keeps no documentation, so the same programs weigh less.
_BIONIC_BASE = """
adduser 3.116ubuntu1 624 passwd
apt 1.6.11 3797 libapt-pkg5.0,gpgv,ubuntu-keyring
base-files 10.1ubuntu2.4 392
base-passwd 3.5.44 228
bash 4.4.18-2ubuntu1 1588 base-files,dash
bsdutils 1:2.31.1-0.4ubuntu3.3 259
bzip2 1.0.6-8.1ubuntu0.1 177
coreutils 8.28-1ubuntu1 6580
dash 0.5.8-2.10 214
debconf 1.5.66 554 perl-base
debianutils 4.8.4 224
diffutils 1:3.6-1 386
dpkg 1.19.0.5ubuntu2.1 6712 tar
e2fsprogs 1.44.1-1ubuntu1.1 1532
fdisk 2.31.1-0.4ubuntu3.3 427
findutils 4.6.0+git+20170828-2 609
gcc-8-base 8.3.0-6ubuntu1~18.04 58
gpgv 2.2.4-1ubuntu1.2 442
grep 3.1-2 945
gzip 1.6-5ubuntu1 240
hostname 3.20 47
init-system-helpers 1.51 133
libacl1 2.2.52-3build1 58
libapt-pkg5.0 1.6.11 2887
libattr1 1:2.4.47-2build1 46
libaudit-common 1:2.8.2-1ubuntu1 30
libaudit1 1:2.8.2-1ubuntu1 148
libblkid1 2.31.1-0.4ubuntu3.3 376
libbz2-1.0 1.0.6-8.1ubuntu0.1 88
libc-bin 2.27-3ubuntu1 3504
libc6 2.27-3ubuntu1 11764
libcap-ng0 0.7.7-3.1 40
libcom-err2 1.44.1-1ubuntu1.1 88
libdb5.3 5.3.28-13.1ubuntu1 1780
libdebconfclient0 0.213ubuntu1 64
libext2fs2 1.44.1-1ubuntu1.1 452
libfdisk1 2.31.1-0.4ubuntu3.3 462
libffi6 3.2.1-8 60
libgcc1 1:8.3.0-6ubuntu1~18.04 99
libgcrypt20 1.8.1-4ubuntu1.1 1150
libgmp10 2:6.1.2+dfsg-2 515
libgnutls30 3.5.18-1ubuntu1.1 1884
libgpg-error0 1.27-6 324
libhogweed4 3.4-1 291
libidn2-0 2.0.4-1.1build2 230
liblz4-1 0.0~r131-2ubuntu3 94
liblzma5 5.2.2-1.3 334
libmount1 2.31.1-0.4ubuntu3.3 432
libncurses5 6.1-1ubuntu1.18.04 310
libncursesw5 6.1-1ubuntu1.18.04 354
libnettle6 3.4-1 354
libp11-kit0 0.23.9-2 1020
libpam-modules 1.1.8-3.6ubuntu2.18.04.1 942
libpam-modules-bin 1.1.8-3.6ubuntu2.18.04.1 216
libpam-runtime 1.1.8-3.6ubuntu2.18.04.1 277
libpam0g 1.1.8-3.6ubuntu2.18.04.1 244
libpcre3 2:8.39-9 667
libprocps6 2:3.3.12-3ubuntu1.1 108
libseccomp2 2.4.1-0ubuntu0.18.04.2 280
libselinux1 2.7-2build2 196
libsemanage-common 2.7-2build2 32
libsemanage1 2.7-2build2 263
libsepol1 2.7-1 693
libsmartcols1 2.31.1-0.4ubuntu3.3 316
libss2 1.44.1-1ubuntu1.1 88
libstdc++6 8.3.0-6ubuntu1~18.04 2000
libsystemd0 237-3ubuntu10.24 694
libtasn1-6 4.13-2 112
libtinfo5 6.1-1ubuntu1.18.04 480
libudev1 237-3ubuntu10.24 232
libunistring2 0.9.9-0ubuntu1 1538
libuuid1 2.31.1-0.4ubuntu3.3 124
libzstd1 1.3.3+dfsg-2ubuntu1 644
login 1:4.5-1ubuntu2 1288
lsb-base 9.20170808ubuntu1 58
mawk 1.3.3-17ubuntu3 183
mount 2.31.1-0.4ubuntu3.3 398
ncurses-base 6.1-1ubuntu1.18.04 376
ncurses-bin 6.1-1ubuntu1.18.04 588
passwd 1:4.5-1ubuntu2 2098
perl-base 5.26.1-6ubuntu0.3 7624
procps 2:3.3.12-3ubuntu1.1 692
sed 4.4-2 312
sensible-utils 0.0.12 62
sysvinit-utils 2.88dsf-59.10ubuntu1 119
tar 1.29b-2ubuntu0.1 876
ubuntu-keyring 2018.09.18.1~18.04.0 45
util-linux 2.31.1-0.4ubuntu3.3 2336
zlib1g 1:1.2.11-dfsg-0ubuntu2 189
"""

_BIONIC_ARCHIVE = (_STRETCH_ARCHIVE.replace("gcc-6", "gcc-7").replace("cpp-6", "cpp-7")
                   .replace("libgcc-6-dev", "libgcc-7-dev").replace("libasan3", "libasan4")
                   .replace("libmpfr4", "libmpfr6").replace("libisl15", "libisl19")
                   .replace("libunistring0", "libunistring2").replace("libcurl3", "libcurl4"))


@dataclass(frozen=True)
class Distro:
    """What apt sees: the base image's packages, the archive, and the size of `apt-get update`'s lists."""

    codename: str
    os_release: str
    base: dict[str, Package]
    archive: dict[str, Package]
    docs: bool  # Debian images keep /usr/share/doc; Ubuntu's minimised images drop it
    lists: tuple[tuple[str, int], ...]  # /var/lib/apt/lists/<name>, bytes
    avg_file_kb: int = 14
    kept: float = 1.0  # share of Installed-Size left on disk (minimised images delete docs and locales)


def _lists(mirror: str, suites: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    out = []
    for suite, packages_bytes in suites:
        dist = suite.replace("/", "_")
        out.append((f"{mirror(suite)}_dists_{dist}_InRelease", 117_000 if "-" not in suite else 92_000))
        out.append((f"{mirror(suite)}_dists_{dist}_main_binary-amd64_Packages.gz", packages_bytes))
    return tuple(out)


def _stretch_mirror(suite):
    return "security.debian.org_debian-security" if suite.endswith("updates") else "deb.debian.org_debian"


def _bionic_mirror(suite):
    return "security.ubuntu.com_ubuntu" if "security" in suite else "archive.ubuntu.com_ubuntu"


DISTROS: dict[str, Distro] = {
    "stretch": Distro(
        "stretch",
        'PRETTY_NAME="Debian GNU/Linux 9 (stretch)"\nNAME="Debian GNU/Linux"\nVERSION_ID="9"\n'
        'VERSION="9 (stretch)"\nVERSION_CODENAME=stretch\nID=debian\nHOME_URL="https://www.debian.org/"\n',
        _pkgs(_STRETCH_BASE, _FILES, "required"),
        _pkgs(_STRETCH_ARCHIVE, _FILES, "optional"),
        True,
        _lists(_stretch_mirror, [("stretch", 10_183_000), ("stretch-updates", 23_000),
                                 ("stretch/updates", 795_000)]),
        avg_file_kb=12,
    ),
    "bionic": Distro(
        "bionic",
        'NAME="Ubuntu"\nVERSION="18.04.3 LTS (Bionic Beaver)"\nID=ubuntu\nID_LIKE=debian\n'
        'PRETTY_NAME="Ubuntu 18.04.3 LTS"\nVERSION_ID="18.04"\nVERSION_CODENAME=bionic\n',
        _pkgs(_BIONIC_BASE, _FILES, "required"),
        _pkgs(_BIONIC_ARCHIVE, {k.replace("-6", "-7"): tuple(f.replace("gcc-6", "gcc-7").replace("cpp-6", "cpp-7")
                                                             for f in v) for k, v in _FILES.items()}, "optional"),
        False,
        _lists(_bionic_mirror, [("bionic", 1_345_000 * 8), ("bionic-updates", 1_120_000),
                                ("bionic-security", 780_000)]),
        avg_file_kb=15,
        kept=0.72,
    ),
}


MAX_GENERATED_FILES = 16
"""Generated files per package, at most: the bytes stay realistic, the file count is kept small (see below)."""


def package_entries(pkg: Package, distro: Distro) -> list[Entry]:
    """The files of an installed package: its notable files, its docs, and generated files making up the rest."""
    rng = random.Random(f"{distro.codename}/{pkg.name}/{pkg.version}")
    entries: list[Entry] = []
    budget = int(pkg.size_kb * 1024 * distro.kept)
    for spec in pkg.files:
        if "->" in spec:
            path, target = spec.split("->")
            entries.append(Entry(path, "symlink", target=target, mode=0o777))
            continue
        path, _, kb = spec.partition(":")
        size = int(kb) * 1024 if kb else 30_000 + rng.randrange(60_000)
        size = min(size, max(budget, 0)) if not kb else size
        executable = "/bin/" in path or "/sbin/" in path or path.endswith(("cc1", "lto1", "collect2"))
        entries.append(Entry(path, size=size, mode=0o755 if executable else 0o644))
        budget -= size
    if distro.docs:
        doc = f"/usr/share/doc/{pkg.name}"
        copyright = (f"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
                     f"Upstream-Name: {pkg.name}\n\n" + "License: GPL-2+\n" * 40).encode()
        entries.append(Entry(f"{doc}/copyright", data=copyright, size=len(copyright)))
        changelog = min(max(budget // 50, 400), 40_000)
        entries.append(Entry(f"{doc}/changelog.Debian.gz", size=changelog))
        budget -= len(copyright) + changelog
    if budget > 0:
        count = max(1, round(budget / (distro.avg_file_kb * 1024)))
        if pkg.name.startswith("lib") and "-dev" not in pkg.name:
            base, ext = f"{ARCH_LIB}/{pkg.name}", ".so"
        elif pkg.name.endswith("-dev"):
            base, ext = f"/usr/include/{pkg.name.removesuffix('-dev')}", ".h"
        elif pkg.name in ("tzdata",):
            base, ext = "/usr/share/zoneinfo/region", ""
        else:
            base, ext = f"/usr/share/{pkg.name}", ".dat"
        weights = [rng.expovariate(1.0) for _ in range(count)]
        total = sum(weights)
        sizes = [int(budget * w / total) for w in weights]
        if count <= MAX_GENERATED_FILES:
            sizes[0] += budget - sum(sizes)
            for i, size in enumerate(sizes):
                entries.append(Entry(f"{base}/{pkg.name}-{i:04d}{ext}", size=size))
        else:
            # Thousands of small files would make every build step slow (each is an open/unlink on
            # disk) without changing any size the lesson shows: keep the first few at their natural
            # size and merge the rest into one larger file, as a package's main library or data file is.
            kept = sizes[:MAX_GENERATED_FILES - 1]
            for i, size in enumerate(kept):
                entries.append(Entry(f"{base}/{pkg.name}-{i:04d}{ext}", size=size))
            entries.append(Entry(f"{base}/{pkg.name}{ext or '.dat'}", size=budget - sum(kept)))
    return entries


def dpkg_stanza(pkg: Package, auto: bool = False) -> str:
    lines = [f"Package: {pkg.name}", "Status: install ok installed", f"Priority: {pkg.priority}",
             f"Installed-Size: {pkg.size_kb}", "Maintainer: Debian maintainers", "Architecture: amd64",
             f"Version: {pkg.version}"]
    if pkg.depends:
        lines.append("Depends: " + ", ".join(pkg.depends))
    lines.append(f"Description: {pkg.name} (simulated by overlaykit)")
    return "\n".join(lines) + "\n\n"


def parse_dpkg_status(text: str) -> dict[str, dict[str, str]]:
    out = {}
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
        if "Package" in fields:
            out[fields["Package"]] = fields
    return out


def dependency_closure(names, archive: dict[str, Package], installed=(), recommends=True) -> list[str]:
    """Packages apt would install for `names`, in dependency order, skipping those already installed."""
    order: list[str] = []
    seen = set(installed)

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        pkg = archive[name]
        for dep in pkg.depends + (pkg.recommends if recommends else ()):
            if dep in archive:
                visit(dep)
        order.append(name)

    for name in names:
        visit(name)
    return order


# ---------------------------------------------------------------------------------------------------
# Base images

_PASSWD = ("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
           "bin:x:2:2:bin:/bin:/usr/sbin/nologin\nsys:x:3:3:sys:/dev:/usr/sbin/nologin\n"
           "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
_GROUP = "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nadm:x:4:\ntty:x:5:\nstaff:x:50:\nusers:x:100:\nnogroup:x:65534:\n"
_SKELETON_DIRS = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt",
                  "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr/bin", "/usr/include",
                  "/usr/lib", "/usr/local/bin", "/usr/local/lib", "/usr/local/share", "/usr/sbin",
                  "/usr/share", "/usr/src", "/var/cache/apt/archives", "/var/lib/apt/lists/partial",
                  "/var/lib/dpkg/info", "/var/log/apt", "/var/tmp")


def _text(path: str, text: str, mode=0o644) -> Entry:
    data = text.encode()
    return Entry(path, size=len(data), mode=mode, data=data)


def _debian_like(distro: Distro) -> list[Entry]:
    entries = [Entry(d, "dir", mode=0o1777 if d in ("/tmp", "/var/tmp") else 0o755) for d in _SKELETON_DIRS]
    entries += [_text("/etc/os-release", distro.os_release), _text("/etc/passwd", _PASSWD),
                _text("/etc/group", _GROUP), _text("/etc/hostname", "localhost\n"),
                _text("/etc/debian_version", "9.9\n" if distro.codename == "stretch" else "buster/sid\n"),
                _text("/etc/apt/sources.list", f"deb http://deb.debian.org/debian {distro.codename} main\n"),
                _text("/etc/apt/apt.conf.d/docker-clean",
                      'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb || true"; };\n')]
    status = []
    for pkg in distro.base.values():
        files = package_entries(pkg, distro)
        entries += files
        listing = "".join(sorted(e.path + "\n" for e in files))
        entries.append(_text(f"/var/lib/dpkg/info/{pkg.name}.list", listing))
        entries.append(Entry(f"/var/lib/dpkg/info/{pkg.name}.md5sums", size=len(files) * 70))
        status.append(dpkg_stanza(pkg))
    entries.append(_text("/var/lib/dpkg/status", "".join(status)))
    entries.append(_text("/var/lib/apt/extended_states", ""))
    # debconf's databases are rewritten by every package installation: a classic source of copy-ups.
    entries.append(Entry("/var/cache/debconf/templates.dat", size=len(distro.base) * 6_000))
    entries.append(Entry("/var/cache/debconf/config.dat", size=len(distro.base) * 250))
    entries.append(_text("/var/log/dpkg.log", "".join(f"install {p} <none> {distro.base[p].version}\n"
                                                      for p in sorted(distro.base))))
    return entries


BUSYBOX_APPLETS = tuple("""
[ [[ addgroup adduser ar arp awk base64 basename bc blkid bunzip2 bzcat bzip2 cal cat chgrp chmod chown
chroot cksum clear cmp comm cp cpio crond cut date dc dd df diff dirname dmesg dnsdomainname du echo ed
egrep env expand expr false fdisk fgrep find fold free fsck fuser getty grep groups gunzip gzip halt
head hexdump hostid hostname httpd id ifconfig init install ip ipcalc kill killall less ln logger login
ls lsof lsusb md5sum mkdir mkfifo mknod mktemp more mount mv nc netstat nice nohup nproc nslookup od
passwd patch pidof ping pivot_root poweroff printenv printf ps pwd readlink realpath reboot renice
reset rev rm rmdir route run-parts sed seq sh sha1sum sha256sum sha512sum sleep sort split stat
strings stty su sync sysctl tac tail tar tee telnet test time timeout top touch tr traceroute true
tty umount uname uniq unlink unzip uptime usleep uudecode uuencode vi watch wc wget which whoami xargs
yes zcat
""".split())


def _busybox(host_binary: bool) -> list[Entry]:
    entries = [Entry(d, "dir", mode=0o1777 if d == "/tmp" else 0o755)
               for d in ("/bin", "/dev", "/etc", "/home", "/proc", "/root", "/sys", "/tmp", "/usr/sbin",
                         "/var/spool/mail", "/var/www")]
    if host_binary:
        with open(HOST_BUSYBOX, "rb") as f:
            data = f.read()
        entries.append(Entry("/bin/busybox", size=len(data), mode=0o755, data=data))
    else:
        entries.append(Entry("/bin/busybox", size=1_130_000, mode=0o755))
    entries += [Entry(f"/bin/{a}", "hardlink", target="/bin/busybox", mode=0o755) for a in BUSYBOX_APPLETS]
    entries += [_text("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"),
                _text("/etc/group", "root:x:0:\nnogroup:x:65534:\n"),
                _text("/etc/os-release", 'NAME="BusyBox"\nID=busybox\n')]
    return entries


def _alpine() -> list[Entry]:
    entries = []
    for e in _busybox(False):
        if e.path == "/etc/os-release":
            continue
        if e.path == "/bin/busybox":
            e = Entry(e.path, size=796_000, mode=0o755)
        elif e.kind == "hardlink":  # Alpine links its applets symbolically
            e = Entry(e.path, "symlink", target="/bin/busybox", mode=0o777)
        entries.append(e)
    rng = random.Random("alpine:3.8")
    entries += [Entry("/lib/ld-musl-x86_64.so.1", size=580_000, mode=0o755),
                Entry("/lib/libc.musl-x86_64.so.1", "symlink", target="ld-musl-x86_64.so.1", mode=0o777),
                Entry("/lib/libcrypto.so.1.0.0", size=2_357_000, mode=0o755),
                Entry("/lib/libssl.so.1.0.0", size=434_000, mode=0o755),
                Entry("/lib/libz.so.1.2.11", size=91_000, mode=0o755),
                Entry("/sbin/apk", size=217_000, mode=0o755),
                _text("/etc/os-release", 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.8.4\n'
                      'PRETTY_NAME="Alpine Linux v3.8"\n'),
                _text("/etc/alpine-release", "3.8.4\n"),
                Entry("/lib/apk/db/installed", size=18_000)]
    entries += [Entry(f"/etc/ssl/certs/cert-{i:03d}.pem", size=1_000 + rng.randrange(1_500)) for i in range(60)]
    entries += [Entry(f"/usr/share/apk/keys/key-{i}.rsa.pub", size=451) for i in range(12)]
    return entries


HOST_BUSYBOX = "/bin/busybox"


@dataclass(frozen=True)
class BaseImage:
    """A simulated base image: its entries, and the config Docker Hub's image has."""

    name: str
    distro: str | None
    cmd: tuple[str, ...]
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    created_by: str = ""
    real_shell: bool = False


BASE_IMAGES: dict[str, BaseImage] = {
    "debian:stretch": BaseImage("debian:stretch", "stretch", ("bash",),
                                created_by="/bin/sh -c #(nop) ADD file:debian-stretch-rootfs.tar.xz in / "),
    "ubuntu:18.04": BaseImage("ubuntu:18.04", "bionic", ("/bin/bash",),
                              created_by="/bin/sh -c #(nop) ADD file:ubuntu-bionic-rootfs.tar.gz in / "),
    "alpine:3.8": BaseImage("alpine:3.8", None, ("/bin/sh",),
                            created_by="/bin/sh -c #(nop) ADD file:alpine-minirootfs-3.8.4.tar.gz in / "),
    "busybox": BaseImage("busybox", None, ("sh",),
                         created_by="/bin/sh -c #(nop) ADD file:busybox-1.31-rootfs.tar in / "),
    "busybox:host": BaseImage("busybox:host", None, ("sh",), real_shell=True,
                              created_by="/bin/sh -c #(nop) ADD file:busybox-static-from-the-host in / "),
}
ALIASES = {"debian:9": "debian:stretch", "ubuntu:bionic": "ubuntu:18.04", "alpine:3.8.4": "alpine:3.8",
           "busybox:latest": "busybox", "ubuntu:18.04.3": "ubuntu:18.04"}


def resolve_name(name: str) -> str | None:
    name = ALIASES.get(name, name)
    return name if name in BASE_IMAGES else None


def host_busybox_available() -> bool:
    """True where Debian's busybox-static is installed: a statically linked shell a chroot can run."""
    try:
        with open(HOST_BUSYBOX, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def base_entries(name: str) -> list[Entry]:
    """Every entry of a simulated base image, deterministic for a given name."""
    key = resolve_name(name)
    if key is None:
        raise KeyError(f"no simulated base image {name!r}; known: {', '.join(sorted(BASE_IMAGES))}")
    spec = BASE_IMAGES[key]
    if spec.distro:
        return _debian_like(DISTROS[spec.distro])
    if key == "alpine:3.8":
        return _alpine()
    return _busybox(host_binary=key == "busybox:host")


def write_entries(entries: list[Entry], dest: str | os.PathLike) -> None:
    """Create entries under the directory `dest` (which must exist); nothing is written outside it."""
    root = os.fspath(dest)
    made = set()

    def real(path):
        return os.path.join(root, path.lstrip("/"))

    def parents(path):
        parent = os.path.dirname(real(path))
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)

    for e in entries:
        parents(e.path)
        p = real(e.path)
        if e.kind == "dir":
            os.makedirs(p, exist_ok=True)
            os.chmod(p, e.mode)
            made.add(p)
        elif e.kind == "symlink":
            if os.path.lexists(p):
                os.remove(p)
            os.symlink(e.target, p)
        elif e.kind == "hardlink":
            if os.path.lexists(p):
                os.remove(p)
            os.link(real(e.target), p)
        else:
            if os.path.islink(p):
                os.remove(p)
            with open(p, "wb") as f:
                f.write(e.content())
            os.chmod(p, e.mode)


def install_entries(fs, entries: list[Entry]) -> int:
    """Create entries through an Overlay-like `fs` (the simulated shell's view); returns bytes written.

    Every call goes through the overlay (so copy-ups and whiteouts happen as they would for dpkg); the
    number of calls per file is kept small because each is a full overlay lookup.
    """
    written, dirs, fresh = 0, set(), set()
    for e in entries:
        parent = e.path.rsplit("/", 1)[0] or "/"
        if parent not in dirs:
            if not fs.exists(parent):
                fs.mkdir(parent, mode=0o755, parents=True)
                fresh.add(parent)
            dirs.add(parent)
        if e.kind == "dir":
            if e.path not in dirs and not fs.exists(e.path):
                fs.mkdir(e.path, mode=e.mode, parents=True)
                fresh.add(e.path)
            dirs.add(e.path)
            continue
        if parent not in fresh and _lexists(fs, e.path):
            fs.remove(e.path)
        if e.kind == "symlink":
            fs.symlink(e.target, e.path)
        elif e.kind == "hardlink":
            fs.link(e.target, e.path)
        else:
            data = e.content()
            fs.write_bytes(e.path, data)
            if e.mode != 0o644:
                fs.chmod(e.path, e.mode)
            written += len(data)
    return written


def _lexists(fs, path) -> bool:
    try:
        fs.stat(path, follow_symlinks=False)
        return True
    except OSError:
        return False


def tree_size(root: str | os.PathLike) -> tuple[int, int]:
    """(bytes in regular files counting each inode once, number of non-directory entries) under root."""
    seen, total, count = set(), 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            count += 1
            if stat_module.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total, count


# ---------------------------------------------------------------------------------------------------
# Downloads and the redis build

@dataclass(frozen=True)
class Download:
    """A file on the (simulated) internet: its size, and what `tar -x` finds inside."""

    url: str
    size: int
    archive_of: str | None = None  # key into SOURCE_TREES


SIM_TARBALL_MAGIC = b"OVERLAYKIT-SIMULATED-TARBALL "

DOWNLOADS: dict[str, Download] = {}
for _v, _size in (("5.0.3", 1_959_445), ("5.0.5", 1_975_750), ("5.0.7", 1_984_203)):
    for _scheme in ("http", "https"):
        _url = f"{_scheme}://download.redis.io/releases/redis-{_v}.tar.gz"
        DOWNLOADS[_url] = Download(_url, _size, f"redis-{_v}")
DOWNLOADS["https://github.com/tianon/gosu/releases/download/1.11/gosu-amd64"] = Download(
    "https://github.com/tianon/gosu/releases/download/1.11/gosu-amd64", 2_393_144)


def download_bytes(url: str) -> bytes:
    d = DOWNLOADS[url]
    if d.archive_of is None:
        return pseudo_content(url, d.size, executable=True)
    head = SIM_TARBALL_MAGIC + d.archive_of.encode() + b"\n"
    return head + pseudo_content(url, d.size - len(head))


def sim_tarball_name(data: bytes) -> str | None:
    if data.startswith(SIM_TARBALL_MAGIC):
        return data[len(SIM_TARBALL_MAGIC):data.index(b"\n")].decode()
    return None


def redis_source(version: str) -> list[Entry]:
    """The redis-x.y.z source tree (paths start with the top directory, like the real tarball): ~8 MB.

    The real tarball has ~700 files; fewer, larger ones keep the same bytes and make the builds fast.
    """
    top = f"redis-{version}"
    rng = random.Random(top)
    entries = [Entry(f"{top}/{n}", size=s) for n, s in (
        ("00-RELEASENOTES", 60_862), ("BUGS", 53), ("CONTRIBUTING", 1_805), ("COPYING", 1_487),
        ("INSTALL", 11), ("MANIFESTO", 4_223), ("README.md", 20_555), ("redis.conf", 62_155),
        ("sentinel.conf", 9_710), ("src/server.c", 171_250), ("src/server.h", 107_394))]
    entries += [_text(f"{top}/Makefile", "default: all\n.DEFAULT:\n\tcd src && $(MAKE) $@\n\ninstall:\n"
                      "\tcd src && $(MAKE) $@\n"),
                _text(f"{top}/src/Makefile", "# simulated: the redis server Makefile\nall: redis-server\n")]
    entries += [Entry(f"{top}/runtest", size=271, mode=0o755)]
    groups = (("src", 40, 4_620_000, ".c"), ("deps/jemalloc/src", 20, 1_640_000, ".c"),
              ("deps/lua/src", 12, 640_000, ".c"), ("deps/hiredis", 8, 260_000, ".c"),
              ("deps/linenoise", 3, 70_000, ".c"), ("tests/unit", 15, 820_000, ".tcl"),
              ("utils", 6, 120_000, ".sh"))
    for directory, count, total, ext in groups:
        weights = [rng.expovariate(1.0) for _ in range(count)]
        scale = total / sum(weights)
        for i, w in enumerate(weights):
            entries.append(Entry(f"{top}/{directory}/file{i:03d}{ext}", size=max(200, int(w * scale))))
    return entries


SOURCE_TREES = {f"redis-{v}": (lambda v=v: redis_source(v)) for v in ("5.0.3", "5.0.5", "5.0.7")}

# What `make` leaves in the source tree (object files, static deps) and what `make install` copies out.
REDIS_BUILD_OUTPUTS = (("src", 30, 11_800_000, ".o"), ("deps/jemalloc/lib", 3, 10_600_000, ".a"),
                       ("deps/jemalloc/src", 15, 5_300_000, ".o"), ("deps/lua/src", 12, 1_100_000, ".o"),
                       ("deps/hiredis", 4, 600_000, ".o"))
REDIS_BINARIES = (("redis-server", 8_409_360), ("redis-benchmark", 4_875_912), ("redis-cli", 5_006_248),
                  ("redis-check-rdb", 8_409_360), ("redis-check-aof", 8_409_360))


def redis_build_entries(srcdir: str) -> list[Entry]:
    rng = random.Random("redis-build")
    entries = []
    for directory, count, total, ext in REDIS_BUILD_OUTPUTS:
        weights = [rng.expovariate(1.0) for _ in range(count)]
        scale = total / sum(weights)
        for i, w in enumerate(weights):
            entries.append(Entry(f"{srcdir}/{directory}/obj{i:03d}{ext}", size=int(w * scale)))
    for name, size in REDIS_BINARIES:
        entries.append(Entry(f"{srcdir}/src/{name}", size=size, mode=0o755))
    return entries


def redis_install_entries(prefix: str = "/usr/local") -> list[Entry]:
    entries = [Entry(f"{prefix}/bin/{name}", size=size, mode=0o755) for name, size in REDIS_BINARIES]
    entries.append(Entry(f"{prefix}/bin/redis-sentinel", "symlink", target="redis-server", mode=0o777))
    return entries



def layer_items(entries: list[Entry], *, mtime: float) -> list:
    """The (LayerEntry, data) pairs `Layer.from_dir` would give for `write_entries(entries, root)` by root.

    Built in memory: writing a base image's thousands of files to disk only to read them back cost
    seconds on slow disks.  Later entries replace earlier ones at the same path, parents are implied
    directories (0755), all owned by root with one mtime, and of a group of hardlinks the first in tar
    order holds the data, as tar writes them.
    """
    from .images import LayerEntry, _sort_key

    t = int(mtime)
    by_path: dict[str, Entry] = {}
    for e in entries:
        by_path[e.path.strip("/")] = e
    dirs = {}
    for path in by_path:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.setdefault("/".join(parts[:i]), 0o755)
    items: dict[str, tuple] = {}
    for d, mode in dirs.items():
        if d not in by_path:
            items[d] = (LayerEntry(d, "dir", mode=mode, mtime=t), None)
    links: dict[str, list[str]] = {}
    for path, e in by_path.items():
        if e.kind == "dir":
            items[path] = (LayerEntry(path, "dir", mode=e.mode, mtime=t), None)
        elif e.kind == "symlink":
            items[path] = (LayerEntry(path, "symlink", mode=0o777, linkname=e.target, mtime=t), None)
        elif e.kind == "hardlink":
            links.setdefault(e.target.strip("/"), []).append(path)
        else:
            data = e.content()
            items[path] = (LayerEntry(path, "file", size=len(data), mode=e.mode, mtime=t), data)
    for target, paths in links.items():
        entry, data = items.pop(target)
        group = sorted([target] + paths, key=lambda p: _sort_key(LayerEntry(p, "file")))
        first = group[0]
        items[first] = (LayerEntry(first, "file", size=entry.size, mode=entry.mode, mtime=t), data)
        for p in group[1:]:
            items[p] = (LayerEntry(p, "hardlink", mode=entry.mode, linkname=first, mtime=t), None)
    return list(items.values())


def base_image(name: str, store):
    """The simulated base image `name`, generated once and then taken from the store's cache."""
    from .images import History, Image, ImageConfig, Layer

    key = resolve_name(name)
    if key is None:
        raise KeyError(f"no simulated base image {name!r}; known: {', '.join(sorted(BASE_IMAGES))}")
    try:
        return store.image(key)
    except KeyError:
        pass
    spec = BASE_IMAGES[key]
    if spec.real_shell and not host_busybox_available():
        raise FileNotFoundError(2, "busybox:host needs Debian's busybox-static (a static /bin/busybox)",
                                HOST_BUSYBOX)
    layer = Layer.from_entries(layer_items(base_entries(key), mtime=BASE_EPOCH))
    config = ImageConfig(env=list(spec.env), cmd=list(spec.cmd))
    history = [History(spec.created_by), History(f'/bin/sh -c #(nop)  CMD {json.dumps(list(spec.cmd))}', True)]
    return store.add_image(Image(key, [layer], config, history))


BASE_EPOCH = 1556236800.0  # 2019-04-26: when these releases were current; fixed for reproducible digests
