"""A tiny in-memory filesystem with the engine Overlay's method names, for testing the simulated shell alone."""

import errno
import os
import posixpath
from dataclasses import dataclass


@dataclass
class _Node:
    kind: str
    mode: int
    data: bytes = b""
    target: str | None = None


@dataclass
class MemStat:
    kind: str
    mode: int
    size: int
    target: str | None


def _err(code, path):
    return OSError(code, os.strerror(code), path)


class MemFS:
    def __init__(self):
        self.nodes = {"/": _Node("dir", 0o755)}

    def _norm(self, p):
        return posixpath.normpath("/" + str(p).lstrip("/")) if str(p) not in ("", ".") else "/"

    def _resolve(self, p, follow=True, depth=0):
        """Resolve symlinks in the parents (and the last component when follow)."""
        p = self._norm(p)
        if depth > 40:
            raise _err(errno.ELOOP, p)
        parts = [x for x in p.split("/") if x]
        cur = "/"
        for i, part in enumerate(parts):
            nxt = posixpath.join(cur, part)
            node = self.nodes.get(nxt)
            last = i == len(parts) - 1
            if node is not None and node.kind == "symlink" and (follow or not last):
                target = node.target if node.target.startswith("/") else posixpath.join(cur, node.target)
                nxt = self._resolve(target, True, depth + 1)
            elif node is not None and node.kind != "dir" and not last:
                raise _err(errno.ENOTDIR, p)
            cur = nxt
        return cur

    def _get(self, p, follow=True):
        r = self._resolve(p, follow)
        if r not in self.nodes:
            raise _err(errno.ENOENT, str(p))
        return r, self.nodes[r]

    def _parent(self, p):
        r = self._resolve(p, follow=False)
        parent = posixpath.dirname(r)
        if parent not in self.nodes:
            raise _err(errno.ENOENT, str(p))
        if self.nodes[parent].kind != "dir":
            raise _err(errno.ENOTDIR, str(p))
        return r

    def exists(self, p):
        try:
            self._get(p)
            return True
        except OSError:
            return False

    def stat(self, p, follow_symlinks=True):
        _, n = self._get(p, follow_symlinks)
        return MemStat(n.kind, n.mode, len(n.data) if n.kind == "file" else 0, n.target)

    def read_bytes(self, p):
        _, n = self._get(p)
        if n.kind == "dir":
            raise _err(errno.EISDIR, str(p))
        return n.data

    def write_bytes(self, p, data, append=False):
        r = self._parent(p)
        r = self._resolve(p)
        n = self.nodes.get(r)
        if n is not None and n.kind == "dir":
            raise _err(errno.EISDIR, str(p))
        if n is None:
            self._parent(r)
            self.nodes[r] = _Node("file", 0o644, bytes(data))
        else:
            n.data = (n.data + bytes(data)) if append else bytes(data)

    def mkdir(self, p, mode=0o777, parents=False):
        r = self._resolve(p)
        if r in self.nodes:
            if parents and self.nodes[r].kind == "dir":
                return
            raise _err(errno.EEXIST, str(p))
        parent = posixpath.dirname(r)
        if parent not in self.nodes:
            if not parents:
                raise _err(errno.ENOENT, str(p))
            self.mkdir(parent, mode, parents=True)
        self._parent(r)
        self.nodes[r] = _Node("dir", mode & 0o7777)

    def remove(self, p):
        r, n = self._get(p, follow=False)
        if n.kind == "dir":
            raise _err(errno.EISDIR, str(p))
        del self.nodes[r]

    def rmdir(self, p):
        r, n = self._get(p, follow=False)
        if n.kind != "dir":
            raise _err(errno.ENOTDIR, str(p))
        if self.listdir(r):
            raise _err(errno.ENOTEMPTY, str(p))
        del self.nodes[r]

    def listdir(self, p="."):
        r, n = self._get(p)
        if n.kind != "dir":
            raise _err(errno.ENOTDIR, str(p))
        prefix = r.rstrip("/") + "/"
        return sorted(k[len(prefix):] for k in self.nodes if k.startswith(prefix) and k != r
                      and "/" not in k[len(prefix):])

    def rename(self, src, dst):
        rs, _ = self._get(src, follow=False)
        rd = self._parent(dst)
        moved = {k: v for k, v in self.nodes.items() if k == rs or k.startswith(rs + "/")}
        for k in moved:
            del self.nodes[k]
        for k, v in moved.items():
            self.nodes[rd + k[len(rs):]] = v

    def chmod(self, p, mode):
        _, n = self._get(p)
        n.mode = mode & 0o7777

    def symlink(self, target, p):
        r = self._parent(p)
        if r in self.nodes:
            raise _err(errno.EEXIST, str(p))
        self.nodes[r] = _Node("symlink", 0o777, target=target)

    def link(self, existing, p):
        _, n = self._get(existing)
        r = self._parent(p)
        if r in self.nodes:
            raise _err(errno.EEXIST, str(p))
        self.nodes[r] = n  # shares the node, as a hard link shares the inode

    def files(self):
        return {k: n for k, n in self.nodes.items() if n.kind == "file"}

    def total_bytes(self):
        return sum(len(n.data) for n in {id(n): n for n in self.files().values()}.values())
