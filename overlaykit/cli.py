"""``python -m overlaykit`` / ``overlaykit``: demo, doctor, build, inspect, export-rootfs, save."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile


def _demo(args) -> int:
    from .course import lesson_overlay, ls, merged_listing, workspace
    steps = [
        ("create a file", lambda ov: ov.write_text("new.txt", "created in merged/\n")),
        ("delete in_lower.txt", lambda ov: ov.remove("in_lower.txt")),
        ("modify in_lower.txt", lambda ov: ov.write_text("in_lower.txt", "changed\n", append=True)),
    ]
    with tempfile.TemporaryDirectory(prefix="overlaykit-demo-") as tmp:
        for i, (title, step) in enumerate(steps, 1):
            ws = workspace(f"step{i}", tmp)
            with lesson_overlay(ws, backend=args.backend) as ov:
                if i == 1:
                    print(f"backend: {ov.backend}   (upper/ format: {ov.encoding.describe()})\n")
                    print("merged/ at the start:")
                    print(_indent(merged_listing(ov)))
                    print()
                print(f"== {i}. {title}  (from a fresh start)")
                step(ov)
                print("merged/:")
                print(_indent(merged_listing(ov)))
                print("upper/ on disk:")
                print(_indent(ls(ov.upper)))
                print("what the filesystem did:")
                print(_indent("\n".join(str(e) for e in ov.trace if e.kind != "lookup")))
                print()
    return 0


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _doctor(args) -> int:
    from .capabilities import doctor
    print(doctor())
    return 0


def _store(path: str | None):
    """The store's folder: the Store itself is opened only if the command needs it (probing costs time)."""
    from .images import default_store_root
    return path or default_store_root()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="overlaykit", description="Container images, layer by layer.")
    parser.add_argument("--store", help="image store folder (default: $OVERLAYKIT_STORE or ~/.cache/overlaykit/store)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="the lesson's lower/upper/merged experiment")
    p.add_argument("--backend", choices=["sim", "kernel", "auto"], default="auto")
    sub.add_parser("doctor", help="which backends this machine allows, and why not")
    sub.add_parser("build", add_help=False, help="build a Dockerfile into the store (see: build --help)")
    p = sub.add_parser(
        "inspect", help="dive-like layer report of an image archive, layout or stored image",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per layer: tar size (bytes of the uncompressed layer tar), file bytes (regular-file\n"
                    "bytes, dive's layer size), paths added/modified/removed, opaque directories.\n\n"
                    "wasted (ours): file bytes stored in some layer that the final root filesystem never\n"
                    "  shows (overwritten, deleted by a whiteout, or hidden by an opaque directory).\n"
                    "efficiency (ours): bytes visible in the final root filesystem / all file bytes stored.\n"
                    "dive's definitions (also shown, to compare with dive's CI thresholds): wasted = total\n"
                    "  size of every path found in two or more layers, surviving copy included; efficiency\n"
                    "  = sum over paths of the smallest size / sum of all sizes; opaque markers ignored.\n\n"
                    "--json: names that are not valid UTF-8 keep their bytes as \\xNN escapes (Python's\n"
                    "backslashreplace).")
    p.add_argument("image", help="an image archive (docker save, OCI archive), an OCI layout folder, or a stored image name")
    p.add_argument("--json", action="store_true", help="machine-readable report (both definitions)")
    p.add_argument("--name", help="which image, when the archive holds several")
    p = sub.add_parser("export-rootfs", help="flatten an image into a new or empty folder")
    p.add_argument("image")
    p.add_argument("dest")
    p.add_argument("--name")
    p = sub.add_parser("save", help="write a stored image as an OCI archive, OCI layout or docker archive")
    p.add_argument("image", help="stored image name (or an archive to convert)")
    p.add_argument("-o", "--output", required=True, help="file (oci, docker) or new folder (oci-layout)")
    p.add_argument("--format", choices=["oci", "oci-layout", "docker"], default="oci")
    p.add_argument("--compression", choices=["gzip", "zstd", "none"], default=None,
                   help="recompress every layer (default: keep each layer's compression; docker: none)")
    p.add_argument("--name", help="which image, when the archive holds several")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "build" in argv:  # the builder has its own options (docker build's): hand it the rest as is
        i = argv.index("build")
        top = parser.parse_args(argv[:i] + ["doctor"])
        from .build import cli_build
        return cli_build(argv[i + 1:] + (["--store", top.store] if top.store else []))
    args = parser.parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return status
    except BrokenPipeError:
        # the reader (``| head``) went away: not an error. As the Python docs advise (signal module,
        # "Note on SIGPIPE"), point stdout at devnull so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _run(args) -> int:
    try:
        if args.cmd == "demo":
            return _demo(args)
        if args.cmd == "doctor":
            return _doctor(args)
        if args.cmd == "inspect":
            from .oci import cli_inspect
            return cli_inspect(args.image, as_json=args.json, name=args.name, store=_store(args.store))
        if args.cmd == "export-rootfs":
            from .oci import cli_export_rootfs
            return cli_export_rootfs(args.image, args.dest, name=args.name, store=_store(args.store))
        if args.cmd == "save":
            from .oci import cli_save
            return cli_save(args.image, args.output, format=args.format, compression=args.compression,
                            name=args.name, store=_store(args.store))
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:
        print(f"overlaykit {args.cmd}: {e}", file=sys.stderr)
        return 1
    return 0
