#!/usr/bin/env python3
"""Verify an `audit-worker prove` output offline, trusting only the verifier key.

Independent of audit-worker's code: C2SP signed note (Ed25519) and RFC 6962 /
RFC 9162 inclusion-proof verification written from the specs. Needs Python 3
and the `cryptography` package (for Ed25519).

    python3 scripts/verify_proof.py proof.json '<name>+<keyid>+<base64 key>'

Exit status 0 and "OK ..." when the event is in the signed log, 1 otherwise.
"""
import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def fail(msg):
    print(f"FAILED: {msg}")
    sys.exit(1)


def open_note(note, verifier):
    # Verifier key: <name>+<8 hex key id>+<base64(0x01 || 32-byte public key)>
    name, key_id_hex, key_b64 = verifier.strip().split("+", 2)
    raw = base64.b64decode(key_b64)
    if len(raw) != 33 or raw[0] != 1:
        fail("verifier key is not an Ed25519 note key")
    pub = raw[1:]
    key_id = hashlib.sha256(name.encode() + b"\n\x01" + pub).digest()[:4]
    if key_id.hex() != key_id_hex:
        fail("verifier key id does not match its name and key")
    # The signed text ends at the last blank line; signature lines follow.
    split = note.rindex("\n\n")
    body, sigs = note[: split + 1], note[split + 2 :]
    for line in sigs.splitlines():
        if not line.startswith("\u2014 "):
            fail("malformed signature line")
        sig_name, blob_b64 = line[2:].split(" ")
        blob = base64.b64decode(blob_b64)
        if sig_name == name and blob[:4] == key_id:
            try:
                Ed25519PublicKey.from_public_bytes(pub).verify(blob[4:], body.encode())
            except InvalidSignature:
                fail("checkpoint signature is invalid")
            origin, size, root = body.rstrip("\n").split("\n")
            return origin, int(size), base64.b64decode(root)
    fail(f"checkpoint carries no signature by {name}")


def verify_inclusion(leaf_data, index, size, proof, root):
    # RFC 9162 section 2.1.3.2
    if index >= size:
        fail("leaf index out of range")
    fn, sn = index, size - 1
    r = hashlib.sha256(b"\x00" + leaf_data).digest()
    for p in proof:
        if sn == 0:
            fail("proof too long")
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        fail("inclusion proof does not lead to the signed root")


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    proof = json.load(open(sys.argv[1], encoding="utf-8"))
    origin, size, root = open_note(proof["checkpoint"], sys.argv[2])
    if size != proof["treeSize"]:
        fail("proof's tree size differs from the signed checkpoint")
    verify_inclusion(
        bytes.fromhex(proof["eventHash"]),
        proof["leafIndex"],
        size,
        [bytes.fromhex(h) for h in proof["inclusionProof"]],
        root,
    )
    print(f"OK: event {proof['event']} is leaf {proof['leafIndex']} of {origin} at size {size}")


if __name__ == "__main__":
    main()
