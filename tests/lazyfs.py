#!/usr/bin/env python3
"""lazyfs: a FUSE filesystem that keeps only what was explicitly synced, for eps's power-cut tests.

    lazyfs.py MOUNTPOINT CONTROL_DIR

Modelled on Jepsen's LazyFS: everything lives in this process's memory, in two versions. Writes,
truncations and directory changes (create, mkdir, rename, unlink) change the live version, which is
what every reader sees. fsync/fdatasync of a file copies that file's live bytes to its durable version;
fsync of a directory copies its live entries to its durable entries. A power cut throws the live
version away: every file gets its durable bytes back, every directory its durable entries, and a file or
directory whose entry was never synced into its parent is gone, with everything below it.

Control, through CONTROL_DIR (outside the mount): the file `ready` appears once the filesystem is
mounted; creating `cut-request-N` makes a power cut, acknowledged by `cut-done-N`. The processes using
the mount must be killed before a cut: the test does that (a cut with a process still writing would
model nothing real). File handles opened before a cut are dead after it.

The kernel must not cache what this process may take back: the mount uses direct_io and zero attribute
and entry timeouts. Locks (flock) are left to the kernel.
"""

import errno
import os
import stat
import sys
import threading
import time

from fuse import FUSE, FuseOSError, Operations


class Node:
    __slots__ = ("kind", "mode", "data", "durable", "pending", "entries", "durable_entries", "mtime")

    def __init__(self, kind, mode):
        self.kind = kind
        self.mode = mode
        self.data = bytearray()
        self.durable = bytearray()
        self.pending = []  # ("w", offset, bytes) and ("t", length) since the last sync
        self.entries = {}
        self.durable_entries = {}
        self.mtime = time.time()


class LazyFS(Operations):
    def __init__(self, control_dir):
        self.lock = threading.RLock()
        self.root = Node("dir", stat.S_IFDIR | 0o755)
        self.control_dir = control_dir
        self.handles = {}
        self.next_handle = 1
        self.cuts = 0

    # --- lookup -------------------------------------------------------------------------------------
    def _lookup(self, path):
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if node.kind != "dir":
                raise FuseOSError(errno.ENOTDIR)
            node = node.entries.get(part)
            if node is None:
                raise FuseOSError(errno.ENOENT)
        return node

    def _parent(self, path):
        head, name = os.path.split(path.rstrip("/"))
        parent = self._lookup(head or "/")
        if parent.kind != "dir":
            raise FuseOSError(errno.ENOTDIR)
        return parent, name

    def _handle(self, node):
        fh = self.next_handle
        self.next_handle += 1
        self.handles[fh] = node
        return fh

    def _node(self, path, fh):
        if fh:
            node = self.handles.get(fh)
            if node is None:
                raise FuseOSError(errno.EBADF)  # opened before a power cut
            return node
        return self._lookup(path)

    # --- power cut ----------------------------------------------------------------------------------
    def cut(self):
        with self.lock:
            seen = set()
            stack = [self.root]
            while stack:
                node = stack.pop()
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.kind == "file":
                    node.data = bytearray(node.durable)
                    node.pending = []
                else:
                    node.entries = dict(node.durable_entries)
                    stack.extend(node.entries.values())
            self.handles.clear()
            self.cuts += 1

    def watch_control(self):
        n = 1
        while True:
            request = os.path.join(self.control_dir, f"cut-request-{n}")
            if os.path.exists(request):
                self.cut()
                with open(os.path.join(self.control_dir, f"cut-done-{n}"), "w") as f:
                    f.write("cut\n")
                n += 1
            else:
                time.sleep(0.005)

    # --- FUSE operations ----------------------------------------------------------------------------
    def init(self, path):
        threading.Thread(target=self.watch_control, daemon=True).start()
        with open(os.path.join(self.control_dir, "ready"), "w") as f:
            f.write("ready\n")

    def getattr(self, path, fh=None):
        with self.lock:
            node = self._lookup(path)
            size = len(node.data) if node.kind == "file" else 4096
            return {
                "st_mode": node.mode,
                "st_nlink": 2 if node.kind == "dir" else 1,
                "st_size": size,
                "st_blocks": (size + 511) // 512,
                "st_uid": os.getuid(),
                "st_gid": os.getgid(),
                "st_atime": node.mtime,
                "st_mtime": node.mtime,
                "st_ctime": node.mtime,
            }

    def access(self, path, amode):
        with self.lock:
            self._lookup(path)
            return 0

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 24, "f_bfree": 1 << 23, "f_bavail": 1 << 23,
                "f_files": 1 << 20, "f_ffree": 1 << 19, "f_namemax": 255}

    def readdir(self, path, fh):
        with self.lock:
            node = self._lookup(path)
            return [".", ".."] + list(node.entries)

    def mkdir(self, path, mode):
        with self.lock:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise FuseOSError(errno.EEXIST)
            parent.entries[name] = Node("dir", stat.S_IFDIR | (mode & 0o7777))
            parent.mtime = time.time()

    def rmdir(self, path):
        with self.lock:
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise FuseOSError(errno.ENOENT)
            if node.entries:
                raise FuseOSError(errno.ENOTEMPTY)
            del parent.entries[name]

    def create(self, path, mode, fi=None):
        with self.lock:
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                node = Node("file", stat.S_IFREG | (mode & 0o7777))
                parent.entries[name] = node
                parent.mtime = time.time()
            return self._handle(node)

    def open(self, path, flags):
        with self.lock:
            node = self._lookup(path)
            if flags & os.O_TRUNC and node.kind == "file":
                self._truncate(node, 0)
            return self._handle(node)

    def opendir(self, path):
        with self.lock:
            self._lookup(path)
            return 0

    def release(self, path, fh):
        with self.lock:
            self.handles.pop(fh, None)
            return 0

    def releasedir(self, path, fh):
        return 0

    def flush(self, path, fh):
        return 0

    def read(self, path, size, offset, fh):
        with self.lock:
            node = self._node(path, fh)
            return bytes(node.data[offset:offset + size])

    def write(self, path, data, offset, fh):
        with self.lock:
            node = self._node(path, fh)
            end = offset + len(data)
            if end > len(node.data):
                node.data.extend(b"\0" * (end - len(node.data)))
            node.data[offset:end] = data
            node.pending.append(("w", offset, bytes(data)))
            node.mtime = time.time()
            return len(data)

    def _truncate(self, node, length):
        if length < len(node.data):
            del node.data[length:]
        else:
            node.data.extend(b"\0" * (length - len(node.data)))
        node.pending.append(("t", length))
        node.mtime = time.time()

    def truncate(self, path, length, fh=None):
        with self.lock:
            self._truncate(self._node(path, fh), length)

    def fsync(self, path, datasync, fh):
        with self.lock:
            node = self._node(path, fh)
            if node.kind == "dir":
                node.durable_entries = dict(node.entries)
                return 0
            for op in node.pending:
                if op[0] == "w":
                    _, offset, data = op
                    end = offset + len(data)
                    if end > len(node.durable):
                        node.durable.extend(b"\0" * (end - len(node.durable)))
                    node.durable[offset:end] = data
                else:
                    length = op[1]
                    if length < len(node.durable):
                        del node.durable[length:]
                    else:
                        node.durable.extend(b"\0" * (length - len(node.durable)))
            node.pending = []
            return 0

    def fsyncdir(self, path, datasync, fh):
        with self.lock:
            node = self._lookup(path)
            node.durable_entries = dict(node.entries)
            return 0

    def unlink(self, path):
        with self.lock:
            parent, name = self._parent(path)
            if name not in parent.entries:
                raise FuseOSError(errno.ENOENT)
            del parent.entries[name]

    def rename(self, old, new):
        with self.lock:
            old_parent, old_name = self._parent(old)
            new_parent, new_name = self._parent(new)
            node = old_parent.entries.get(old_name)
            if node is None:
                raise FuseOSError(errno.ENOENT)
            del old_parent.entries[old_name]
            new_parent.entries[new_name] = node

    def chmod(self, path, mode):
        with self.lock:
            node = self._lookup(path)
            node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
            return 0

    def chown(self, path, uid, gid):
        return 0

    def utimens(self, path, times=None):
        with self.lock:
            self._lookup(path).mtime = times[1] if times else time.time()
            return 0


def main():
    mountpoint, control_dir = sys.argv[1], sys.argv[2]
    FUSE(LazyFS(control_dir), mountpoint, foreground=True, nothreads=False, direct_io=True,
         attr_timeout=0, entry_timeout=0, negative_timeout=0, default_permissions=True)


if __name__ == "__main__":
    main()
