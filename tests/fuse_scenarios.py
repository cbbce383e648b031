"""Shell-level scenarios run with plain ``os.*`` calls and shell commands on a mounted overlay.

The same scenarios run on overlaykit-fuse, on the kernel's overlay and on fuse-overlayfs; `play` returns
every outcome (value or errno) and the merged tree, `upper_snapshot` upper/ as stored on disk.

Run as a script (``python fuse_scenarios.py kernel TMP OUT``) it mounts the kernel's overlay of TMP's layers
(the caller puts it in a private mount namespace: ``unshare -m`` as root, ``unshare -Urm`` otherwise),
plays the scenarios, unmounts and writes the JSON result to OUT.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat as st
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from differential import D, F, build_layer  # noqa: E402

from overlaykit.ondisk import Encoding  # noqa: E402

LOWERS = [
    {  # lower0: the top lower
        "a": F("alpha\n"), "trunc": F("0123456789"), "otrunc": F("big" * 1000), "openw": F("keep me"),
        "pw": F("0000000000"), "gone": F("x"), "ren_src": F("r"), "hl": F("hl"), "chm": F("c", 0o644),
        "xa": F("x"), "sh_rm": F("s"), "sh_mv": F("m"), "kept": F("kept"), "dir": D(), "dir/f": F("f"),
    },
    {  # lower1
        "tree": D(), "tree/sub": D(), "tree/sub/x": F("x"), "tree/y": F("y"), "ldir": D(), "ldir/z": F("z"),
        "nonempty": D(), "nonempty/k": F("k"),
    },
]


def build(tmp: str) -> tuple[list[str], str, str]:
    """The layers under tmp (lower0, lower1, upper, work) in the kernel's encoding for this user."""
    enc = Encoding("kernel", "trusted" if os.geteuid() == 0 else "user")
    lowers = [os.path.join(tmp, f"lower{i}") for i in range(len(LOWERS))]
    for root, spec in zip(lowers, LOWERS):
        build_layer(root, spec, enc)
    os.makedirs(os.path.join(tmp, "upper"))
    os.makedirs(os.path.join(tmp, "work"))
    return lowers, os.path.join(tmp, "upper"), os.path.join(tmp, "work")


def outcome(fn):
    try:
        value = fn()
    except OSError as e:
        return ["err", errno.errorcode.get(e.errno, str(e.errno))]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return ["ok", value]


def _owner(uid: int) -> str | int:
    """Owners relative to the caller, so root and user-namespace runs compare."""
    return "me" if uid == os.geteuid() else uid


def _user_xattrs(path: str) -> dict:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return {"err": errno.errorcode.get(e.errno)}
    return {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in sorted(names)
            if n.startswith("user.") and not n.startswith(("user.overlay.", "user.fuseoverlayfs."))}


def merged_snapshot(mnt: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(mnt):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            real = os.path.join(dirpath, name)
            rel = os.path.relpath(real, mnt)
            s = os.lstat(real)
            entry = {"mode": oct(s.st_mode), "uid": _owner(s.st_uid), "gid": _owner(s.st_gid),
                     "xattrs": _user_xattrs(real)}
            if st.S_ISREG(s.st_mode):
                with open(real, "rb") as f:
                    entry.update(size=s.st_size, nlink=s.st_nlink, sha=hashlib.sha256(f.read()).hexdigest()[:12])
            elif st.S_ISLNK(s.st_mode):
                entry.update(target=os.readlink(real))
            out[rel] = entry
    return out


def upper_snapshot(upper: str, ns: str) -> dict:
    """upper/ as stored: whiteouts (char 0/0), opaque dirs, files with owner, mode, size, links, content."""
    enc = Encoding("kernel", ns)
    out = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in sorted(dirnames + filenames):
            real = os.path.join(dirpath, name)
            rel = os.path.relpath(real, upper)
            s = os.lstat(real)
            if enc.is_whiteout(dirpath, name):
                out[rel] = "whiteout"
            elif st.S_ISDIR(s.st_mode):
                out[rel] = ["dir", oct(st.S_IMODE(s.st_mode)), _owner(s.st_uid), bool(enc.is_opaque(real))]
            elif st.S_ISLNK(s.st_mode):
                out[rel] = ["symlink", os.readlink(real)]
            elif st.S_ISREG(s.st_mode):
                with open(real, "rb") as f:
                    sha = hashlib.sha256(f.read()).hexdigest()[:12]
                out[rel] = ["file", oct(st.S_IMODE(s.st_mode)), _owner(s.st_uid), s.st_size, s.st_nlink, sha,
                            _user_xattrs(real)]
            else:
                out[rel] = ["other", oct(s.st_mode)]
    return out


def _write(path: str, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


def _open_close(path: str, flags: int) -> None:
    os.close(os.open(path, flags))


def _pwrite(path: str) -> bytes:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"XY", 4)
        os.pwrite(fd, b"Z", 12)  # past the end: a hole of zeros
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def _kept_across_rename(m) -> bytes:
    with open(m("kept"), "r+b") as f:
        os.rename(m("kept"), m("kept2"))
        f.seek(0, 2)
        f.write(b"+after rename")
    with open(m("kept2"), "rb") as f:
        return f.read()


def _renameat2(src: str, dst: str, flags: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) != 0:  # AT_FDCWD
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src)


RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def _ls(mnt: str) -> list:
    """``ls -lan``: type+mode, links, owner, group, size (not for dirs) and name of each entry."""
    text = subprocess.run(["ls", "-lan", "--time-style=+T", mnt], capture_output=True, text=True,
                          check=True).stdout
    rows = []
    me = str(os.geteuid())
    for line in text.splitlines()[1:]:
        mode, links, uid, gid, size, _t, name = line.split(None, 6)
        if name in (".", ".."):
            continue
        rows.append([mode, links, "me" if uid == me else uid, "me" if gid == str(os.getegid()) else gid,
                     None if mode.startswith("d") else size, name])
    return rows


def _shell(mnt: str) -> list:
    script = ('set -e; cd "$1"; echo x > sh_new; echo y >> a; rm sh_rm; mv sh_mv sh_mv2; '
              'rm -rf dir; ls -a; cat a')
    r = subprocess.run(["sh", "-c", script, "sh", mnt], capture_output=True, text=True)
    return [r.returncode, r.stdout.split("\n"), r.stderr.strip() != ""]


def play(mnt: str) -> dict:
    """Every scenario on the overlay mounted at ``mnt``; outcomes, merged tree, ``ls -la`` rows."""
    def m(p: str) -> str:
        return os.path.join(mnt, p)

    uid, gid = (1234, 1234) if os.geteuid() == 0 and not _in_userns() else (os.geteuid(), os.getegid())
    steps = [
        ("append to a lower file", lambda: _write(m("a"), b"more\n", "ab")),
        ("truncate a lower file", lambda: os.truncate(m("trunc"), 3)),
        ("O_TRUNC open of a lower file", lambda: _write(m("otrunc"), b"new")),
        ("open for write, write nothing", lambda: _open_close(m("openw"), os.O_WRONLY)),
        ("pwrite at offsets", lambda: _pwrite(m("pw"))),
        ("create a file", lambda: _write(m("new.txt"), b"created\n")),
        ("remove a lower file", lambda: os.unlink(m("gone"))),
        ("stat the removed file", lambda: os.stat(m("gone")).st_size),
        ("rm -rf a lower dir", lambda: shutil.rmtree(m("tree"))),
        ("mkdir over a whiteout", lambda: os.mkdir(m("tree"))),
        ("the new dir is empty (opaque)", lambda: os.listdir(m("tree"))),
        ("create in the opaque dir", lambda: _write(m("tree/fresh"), b"fresh")),
        ("rename a lower file", lambda: os.rename(m("ren_src"), m("ren_dst"))),
        ("rename a lower dir (no redirect_dir)", lambda: os.rename(m("ldir"), m("ldir2"))),
        ("mkdir a new dir", lambda: os.mkdir(m("nd"))),
        ("rename a new dir", lambda: os.rename(m("nd"), m("nd2"))),
        ("hard link a lower file", lambda: os.link(m("hl"), m("hl2"))),
        ("the links share an inode", lambda: os.stat(m("hl")).st_ino == os.stat(m("hl2")).st_ino),
        ("the links count two", lambda: [os.stat(m("hl")).st_nlink, os.stat(m("hl2")).st_nlink]),
        ("symlink", lambda: os.symlink("a", m("sl"))),
        ("readlink", lambda: os.readlink(m("sl"))),
        ("read through the symlink", lambda: open(m("sl"), "rb").read()),
        ("chmod a lower file", lambda: os.chmod(m("chm"), 0o600)),
        ("chown a lower file", lambda: os.chown(m("chm"), uid, gid)),
        ("utime a lower file", lambda: os.utime(m("chm"), (1_000_000_000, 1_100_000_000))),
        ("its times", lambda: [os.stat(m("chm")).st_atime_ns, os.stat(m("chm")).st_mtime_ns]),
        ("setxattr user.* on a lower file", lambda: os.setxattr(m("xa"), "user.test", b"value")),
        ("getxattr", lambda: os.getxattr(m("xa"), "user.test")),
        ("listxattr user.*", lambda: sorted(n for n in os.listxattr(m("xa")) if n.startswith("user."))),
        ("getxattr missing", lambda: os.getxattr(m("a"), "user.nothing")),
        ("a file kept open across a rename", lambda: _kept_across_rename(m)),
        ("rmdir a non-empty lower dir", lambda: os.rmdir(m("nonempty"))),
        ("unlink a dir", lambda: os.unlink(m("dir"))),
        ("mkdir over a file", lambda: os.mkdir(m("a"))),
        ("open a missing file", lambda: os.open(m("missing"), os.O_RDONLY)),
        ("open a dir for write", lambda: os.open(m("dir"), os.O_WRONLY)),
        ("rename a dir over a file", lambda: os.rename(m("nonempty"), m("a"))),
        ("rmdir a file", lambda: os.rmdir(m("a"))),
        ("hard link a dir", lambda: os.link(m("dir"), m("dirlink"))),
        ("create with O_EXCL over a file", lambda: os.open(m("a"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
        ("rename NOREPLACE onto a file", lambda: _renameat2(m("trunc"), m("a"), RENAME_NOREPLACE)),
        ("rename NOREPLACE to a new name", lambda: _renameat2(m("trunc"), m("trunc2"), RENAME_NOREPLACE)),
        ("rename EXCHANGE of two lower files", lambda: _renameat2(m("xa"), m("hl"), RENAME_EXCHANGE)),
        ("rename WHITEOUT", lambda: _renameat2(m("openw"), m("openw2"), RENAME_WHITEOUT)),
        ("ls -la", lambda: _ls(mnt)),
        ("shell: echo, >>, rm, mv, rm -rf, ls", lambda: _shell(mnt)),
    ]
    results = {name: outcome(fn) for name, fn in steps}
    return {"results": results, "merged": merged_snapshot(mnt)}


def kernel_mount_options(lowers, upper, work) -> str:
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},index=off,metacopy=off"
    if os.geteuid() != 0 or _in_userns():
        return opts + ",userxattr"  # (a user namespace's mount refuses an explicit redirect_dir)
    return opts + ",redirect_dir=off"


def _in_userns() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def main(argv: list[str]) -> int:
    impl, tmp, out = argv
    assert impl == "kernel"
    lowers = [os.path.join(tmp, f"lower{i}") for i in range(len(LOWERS))]
    upper, work, mnt = (os.path.join(tmp, x) for x in ("upper", "work", "merged"))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", kernel_mount_options(lowers, upper, work), mnt],
                   check=True)
    try:
        result = play(mnt)
    finally:
        subprocess.run(["umount", mnt], check=True)
    result["upper"] = upper_snapshot(upper, "user" if _in_userns() else "trusted")
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
