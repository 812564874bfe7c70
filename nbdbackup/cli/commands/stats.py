"""`nbdbackup stats`: what the repository holds and what dedup/compression save."""

from __future__ import annotations

import argparse

NAME = "stats"
HELP = "show repository totals: logical and stored bytes, dedup and compression ratios"
DESCRIPTION = (
    "logical_bytes: sum of the disk sizes of all backups. unique_bytes: bytes of\n"
    "distinct non-zero chunks (after dedup and zero elimination, before\n"
    "compression). stored_chunk_bytes: those chunks as stored. dedup_ratio =\n"
    "logical/unique, compression_ratio = unique/stored. pack_bytes: all packs on\n"
    "disk (chunks, map segments, manifests, headers, and orphans gc has not reclaimed)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args) -> int:
    from ..output import human_bytes, print_json
    from ..repoargs import open_repo

    with open_repo(args) as repo:
        s = repo.stats()
        s = {"path": repo.path, "repo_id": repo.repo_id, "chunk_size": repo.chunk_size, **s}
    if args.json:
        print_json(s)
        return 0

    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"
    lines = [
        ("repository", s["path"]),
        ("backups", f"{s['backups']} of {s['disks']} disk(s)"),
        ("logical", human_bytes(s["logical_bytes"])),
        ("unique data", human_bytes(s["unique_bytes"])),
        ("stored chunks", human_bytes(s["stored_chunk_bytes"])),
        ("maps", human_bytes(s["map_bytes"])),
        ("packs on disk", f"{human_bytes(s['pack_bytes'])} in {s['packs']} pack(s)"),
        ("chunks", str(s["chunks"])),
        ("dedup ratio", ratio(s["dedup_ratio"])),
        ("compression ratio", ratio(s["compression_ratio"])),
    ]
    w = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(w)}  {v}")
    return 0
