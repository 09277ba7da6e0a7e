#!/usr/bin/env python3
"""A tlog-tiles client written from the specifications only (C2SP
tlog-tiles and signed-note, RFC 6962, RFC 9162), independent of
audit-worker's code: it fetches the checkpoint and tiles over HTTP,
recomputes the root, an inclusion proof of one entry and a consistency
proof from an older checkpoint, and verifies them.

    python3 tests/tlog_reader.py BASE_URL VERIFIER_KEY ORIGIN OLD_CHECKPOINT_FILE LEAF_INDEX...

Prints a JSON summary; exit status 1 on any failure.
"""
import base64
import hashlib
import json
import sys
import urllib.request

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def h(b):
    return hashlib.sha256(b).digest()


def open_note(note, key, origin):
    name, key_id_hex, key_b64 = key.split("+", 2)
    raw = base64.b64decode(key_b64)
    assert raw[0] == 1 and len(raw) == 33, "not an Ed25519 verifier key"
    key_id = h(name.encode() + b"\n\x01" + raw[1:])[:4]
    assert key_id.hex() == key_id_hex, "key id mismatch"
    body, sigs = note.split("\n\n", 1)
    body += "\n"
    for line in sigs.splitlines():
        who, sig = line.removeprefix("\u2014 ").split(" ")
        sig = base64.b64decode(sig)
        if who == name and sig[:4] == key_id:
            Ed25519PublicKey.from_public_bytes(raw[1:]).verify(sig[4:], body.encode())
            o, size, root = body.splitlines()[:3]
            assert o == origin, f"origin {o!r} is not {origin!r}"
            return int(size), base64.b64decode(root)
    raise AssertionError("no signature by the key")


class Tiles:
    def __init__(self, base, size):
        self.base, self.size, self.cache, self.fetched = base.rstrip("/"), size, {}, 0

    def get(self, path):
        if path not in self.cache:
            with urllib.request.urlopen(f"{self.base}/log/{path}") as r:
                self.cache[path] = r.read()
            self.fetched += 1
        return self.cache[path]

    @staticmethod
    def index_path(n):
        s = str(n)
        s = "0" * (-len(s) % 3) + s
        groups = [s[i : i + 3] for i in range(0, len(s), 3)]
        return "/".join(["x" + g for g in groups[:-1]] + [groups[-1]])

    def tile_path(self, level, idx, entries=False):
        # Width of tile idx at this tree size: complete nodes only.
        nodes = self.size if entries else self.size >> (8 * level)
        width = min(256, nodes - idx * 256)
        assert width > 0, "tile beyond the tree"
        head = "tile/entries" if entries else f"tile/{level}"
        return f"{head}/{self.index_path(idx)}" + ("" if width == 256 else f".p/{width}")

    def node(self, height, index):
        """Hash of the perfect subtree of 2^height leaves at index."""
        level, r = divmod(height, 8)
        first = index << r
        data = self.get(self.tile_path(level, first // 256))
        at = first % 256
        nodes = [data[32 * i : 32 * i + 32] for i in range(at, at + (1 << r))]
        assert all(len(n) == 32 for n in nodes), "tile too short"
        while len(nodes) > 1:
            nodes = [h(b"\x01" + nodes[i] + nodes[i + 1]) for i in range(0, len(nodes), 2)]
        return nodes[0]

    def mth(self, lo, hi):
        """RFC 6962 MTH(D[lo:hi])."""
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            return self.node(n.bit_length() - 1, lo // n)
        k = 1 << ((n - 1).bit_length() - 1)
        return h(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi))

    def entry(self, m):
        data = self.get(self.tile_path(0, m // 256, entries=True))
        entries, at = [], 0
        while at < len(data):
            length = int.from_bytes(data[at : at + 2], "big")
            entries.append(data[at + 2 : at + 2 + length])
            at += 2 + length
        return entries[m % 256]


def largest_pow2_below(n):
    return 1 << ((n - 1).bit_length() - 1)


def path(t, m, lo, hi):
    """RFC 6962 2.1.1 PATH(m, D[lo:hi])."""
    n = hi - lo
    if n == 1:
        return []
    k = largest_pow2_below(n)
    if m < k:
        return path(t, m, lo, lo + k) + [t.mth(lo + k, hi)]
    return path(t, m - k, lo + k, hi) + [t.mth(lo, lo + k)]


def subproof(t, m, lo, hi, b):
    """RFC 6962 2.1.2 SUBPROOF(m, D[lo:hi], b)."""
    n = hi - lo
    if m == n:
        return [] if b else [t.mth(lo, hi)]
    k = largest_pow2_below(n)
    if m <= k:
        return subproof(t, m, lo, lo + k, b) + [t.mth(lo + k, hi)]
    return subproof(t, m - k, lo + k, hi, False) + [t.mth(lo, lo + k)]


def verify_inclusion(leaf, m, n, proof, root):
    """RFC 9162 2.1.3.2."""
    fn, sn, r = m, n - 1, h(b"\x00" + leaf)
    for p in proof:
        assert sn != 0, "proof too long"
        if fn & 1 or fn == sn:
            r = h(b"\x01" + p + r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = h(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    assert sn == 0 and r == root, "inclusion proof does not verify"


def verify_consistency(m, n, old_root, new_root, proof):
    """RFC 9162 2.1.4.2."""
    if m == n:
        assert not proof and old_root == new_root
        return
    if m & (m - 1) == 0:
        proof = [old_root] + proof
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        assert sn != 0, "proof too long"
        if fn & 1 or fn == sn:
            fr = h(b"\x01" + c + fr)
            sr = h(b"\x01" + c + sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = h(b"\x01" + sr + c)
        fn >>= 1
        sn >>= 1
    assert fr == old_root and sr == new_root and sn == 0, "consistency proof does not verify"


def main():
    base, key, origin, old_file, *leaves = sys.argv[1:]
    with urllib.request.urlopen(f"{base.rstrip('/')}/log/checkpoint") as r:
        size, root = open_note(r.read().decode(), key, origin)
    old_size, old_root = open_note(open(old_file, encoding="utf-8").read(), key, origin)
    t = Tiles(base, size)
    assert t.mth(0, size) == root, "root from tiles differs from the checkpoint"
    out = {"size": size, "root": root.hex(), "oldSize": old_size, "leaves": {}}
    for m in map(int, leaves):
        entry = t.entry(m)
        assert h(b"\x00" + entry) == t.node(0, m), "entry bundle and level-0 tile disagree"
        verify_inclusion(entry, m, size, path(t, m, 0, size), root)
        out["leaves"][m] = entry.hex()
    verify_consistency(old_size, size, old_root, root, subproof(t, old_size, 0, size, True))
    out["consistency"] = True
    out["tilesFetched"] = t.fetched
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}")
        sys.exit(1)
