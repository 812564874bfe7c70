"""Property test: any sequence of backups (puts in any order, zero puts, resizes) reads back exactly."""

import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo


def chunk(tag: int) -> bytes:
    # a few distinct contents so dedup happens; tag 0 = zeros
    if tag == 0:
        return bytes(CS)
    return hashlib.shake_256(b"%d" % tag).digest(CS)


step = st.tuples(
    st.integers(1, 14),                                    # size in chunks (last may be short)
    st.integers(0, CS - 1),                                # bytes cut from the end
    st.lists(st.tuples(st.integers(0, 13), st.integers(0, 4)), max_size=12),   # (index, tag) puts
    st.randoms(use_true_random=False),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=4))
def test_backups_match_model(tmp_path_factory, steps):
    path = tmp_path_factory.mktemp("model")
    repo = new_repo(path / "r", segment_len=3, pack_size=300 * 1024)
    try:
        parent, model = None, b""
        for nch, cut, puts, rnd in steps:
            size = max(1, nch * CS - cut)
            n = (size + CS - 1) // CS
            new = bytearray(model[:size].ljust(size, b"\0"))
            put = {}
            # the engine contract after a resize: re-put from the parent's last chunk on
            if parent is not None and parent.size != size:
                first = max(0, min(len(model), size) // CS - (1 if min(len(model), size) % CS == 0 else 0))
                for i in range(first, n):
                    put[i] = 0 if i * CS >= len(model) else None     # None: re-put current bytes
            for i, tag in puts:
                if i < n:
                    put[i] = tag
            for i, tag in put.items():
                ln = min(CS, size - i * CS)
                if tag is None:
                    continue
                new[i * CS:i * CS + ln] = chunk(tag)[:ln]
            kind = "incremental" if parent is not None else "full"
            w = repo.writer("vda", kind=kind, size=size, parent=parent)
            order = list(put)
            rnd.shuffle(order)
            for i in order:
                data = bytes(new[i * CS:i * CS + min(CS, size - i * CS)])
                w.put(i, w.prepare(data))
            if kind == "full":
                for i in range(n):
                    if i not in put:
                        new[i * CS:i * CS + min(CS, size - i * CS)] = bytes(min(CS, size - i * CS))
            parent = w.commit(read_bytes=0, duration_s=0)
            model = bytes(new)
            with repo.open_image(parent) as img:
                assert img.read(0, size) == model
                assert sum(n for _, n, _ in img.extents()) == size
                for off, ln, z in img.extents():
                    assert (model[off:off + ln] == bytes(ln)) if z else all(
                        model[i * CS:(i + 1) * CS] != bytes(min(CS, size - i * CS))
                        for i in range(off // CS, (off + ln + CS - 1) // CS))
        # every earlier backup is still intact
        for b in repo.list_backups():
            with repo.open_image(b) as img:
                img.read(0, img.size)
    finally:
        repo.close()
