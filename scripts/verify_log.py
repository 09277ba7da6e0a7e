#!/usr/bin/env python3
"""Verify audit-worker's log offline, trusting only the verifier key.

Independent of audit-worker's code: the record digest (leaf v2, README
"Record digest (leaf v2)"), RFC 8785 JSON canonicalisation, the RFC 6962
Merkle tree, RFC 9162 inclusion proofs and C2SP signed notes (Ed25519) are
written here from their specifications. Needs Python 3 and the
`cryptography` package (for Ed25519).

    python3 scripts/verify_log.py --key '<name>+<keyid>+<base64 key>' \\
        [--checkpoint NOTE] [--origin ORIGIN] [--export EXPORT.ndjson[.gz]] \\
        [--proofs PROOFS.json] [--require-proofs] [--json]

--checkpoint  a signed checkpoint note (file); default: the checkpoint of
              the first proof.
--origin      the log origin to require (a proof or checkpoint of any other
              log is refused).
--export      an `audit-worker export --format ndjson` file (plain or gzip):
              every sealed event's leaf is recomputed from its exported
              record and salts (and, for values a GDPR erasure replaced by
              pseudonyms, the commitments it kept); when the export holds every leaf up to the
              checkpoint's size, the tree's root must equal the signed root.
--proofs      `audit-worker prove` outputs: one JSON object, a JSON array or
              one object per line. Each must verify against its signed
              checkpoint; when the export holds the event, the proof's leaf
              must equal the leaf recomputed from the exported record.
--require-proofs  every sealed event of --export must have its proof in
              --proofs (a subject access export and its .proofs.ndjson).

Exit status 0 and "OK ..." when everything checks, 1 with one "FAILED ..."
line per problem otherwise.
"""
import argparse
import base64
import gzip
import hashlib
import json
import math
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

RECORD_PREFIX_V2 = b"audit-worker/record/v2\n"


class Failure(Exception):
    pass


# --- RFC 8785 (JCS) -------------------------------------------------------


def es6_number(x):
    """ECMAScript Number.prototype.toString of a double (RFC 8785 3.2.2.3)."""
    if isinstance(x, bool):
        raise Failure("internal: bool is not a number")
    if isinstance(x, int):
        # Integers a JSON parser keeps exact (64-bit) are written exactly;
        # larger ones are doubles, as in the worker's JSON library.
        if -(2**63) <= x < 2**64:
            return str(x)
        x = float(x)
    if math.isnan(x) or math.isinf(x):
        raise Failure("NaN and Infinity are not JSON")
    if x == 0:
        return "0"
    if x < 0:
        return "-" + es6_number(-x)
    r = repr(x)  # shortest round-trip digits, as ECMAScript requires
    mant, exp = (r.split("e") + ["0"])[:2]
    exp = int(exp)
    ip, fp = (mant.split(".") + [""])[:2]
    if ip == "0":
        stripped = fp.lstrip("0")
        n = -(len(fp) - len(stripped)) + exp
        digits = stripped.rstrip("0")
    else:
        n = len(ip) + exp
        digits = (ip + fp).rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    e = n - 1
    sign = "+" if e >= 0 else "-"
    head = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{head}e{sign}{abs(e)}"


def jcs(v):
    """RFC 8785 canonical JSON text of a parsed JSON value."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return es6_number(v)
    if isinstance(v, str):
        # Escapes exactly ", \ and the control characters (short forms for
        # \b \f \n \r \t, lowercase \u00xx otherwise), as RFC 8785 3.2.2.2.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ",".join(jcs(x) for x in v) + "]"
    if isinstance(v, dict):
        keys = sorted(v, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + jcs(v[k]) for k in keys) + "}"
    raise Failure(f"not a JSON value: {v!r}")


# --- record digest (leaf v2) and canonical hash v1 ------------------------

# export column -> record member
PLAIN = {
    "idempotency_key": "idempotencyKey",
    "event_id": "eventId",
    "event_time": "eventTime",
    "timestamp": "timestamp",
    "action": "action",
    "status": "status",
    "principal_id": "principalId",
    "organization_id": "organizationId",
    "target_resource_type": "targetResourceType",
    "target_resource_id": "targetResourceId",
    "outcome_description": "outcomeDescription",
    "hash": "hash",
    "hash_algorithm": "hashAlgorithm",
    "hash_provided": "hashProvided",
    "signature": "signature",
    "signature_algorithm": "signatureAlgorithm",
    "signature_key_id": "signatureKeyId",
    "event_version": "eventVersion",
    "correlation_id": "correlationId",
    "data_classification": "dataClassification",
    "retention_policy": "retentionPolicy",
    "session_context": "sessionContext",
    "details": "details",
    "source": "source",
    "ingested_at": "ingestedAt",
}


def commitment(salt, value):
    data = value.encode("utf-8") if isinstance(value, str) else jcs(value).encode("utf-8")
    return hashlib.sha256(salt + data).hexdigest()


def record_digest(row):
    """SHA-256(prefix || JCS(record)) of an exported row (README spec)."""
    rec = {}
    for col, member in PLAIN.items():
        if col not in row:
            raise Failure(f"export lacks column {col}: export with this version's audit-worker")
        rec[member] = row[col]
    salts = row.get("salts") or {}
    # A GDPR erasure replaced these paths' values by pseudonyms and
    # destroyed their salts; the row carries the commitments the leaf was
    # sealed with, which stand for the values.
    erased = row.get("erased_commitments") or {}
    both = set(salts) & set(erased)
    if both:
        raise Failure(f"{sorted(both)[0]} has both a salt and an erasure commitment")
    openings = {p: ("salt", v) for p, v in salts.items()}
    openings.update({p: ("kept", v) for p, v in erased.items()})
    for path, (kind, hex_value) in openings.items():
        raw = bytes.fromhex(hex_value)
        if len(raw) != 32:
            raise Failure(f"{'salt' if kind == 'salt' else 'erasure commitment'} of {path} is not 32 bytes")

        def opened(value, raw=raw, kind=kind):
            return commitment(raw, value) if kind == "salt" else raw.hex()

        if "." in path:
            container, key = path.split(".", 1)
            if container not in ("details", "sessionContext"):
                raise Failure(f"salt path {path} is not a personal field")
            obj = rec[container]
            if not isinstance(obj, dict) or obj.get(key) is None:
                raise Failure(f"a salt is stored for {path}, which holds no value")
            obj[key] = opened(obj[key])
        else:
            if path not in ("principalId", "targetResourceId") or rec[path] is None:
                raise Failure(f"a salt is stored for {path}, which holds no value")
            rec[path] = opened(rec[path])
    rec["commitments"] = sorted(openings, key=lambda k: k.encode("utf-16-be"))
    return hashlib.sha256(RECORD_PREFIX_V2 + jcs(rec).encode("utf-8")).digest()


def canonical_hash_v1(row):
    """The producers' 8-field hash v1 (JavaScript JSON.stringify strings)."""
    fields = {
        "timestamp": row.get("timestamp"),
        "action": row.get("action"),
        "status": row.get("status"),
        "principalId": row.get("principal_id"),
        "organizationId": row.get("organization_id"),
        "targetResourceType": row.get("target_resource_type"),
        "targetResourceId": row.get("target_resource_id"),
        "outcomeDescription": row.get("outcome_description"),
    }
    parts = []
    for name in sorted(fields, key=lambda k: k.encode("utf-16-be")):
        v = fields[name]
        parts.append(name + ":" + ("null" if v in (None, "") else json.dumps(v, ensure_ascii=False)))
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()


def leaf_data(row):
    """(leaf data, problem) of an exported sealed row."""
    version = row.get("leaf_version")
    if version == 2:
        return record_digest(row), None
    if version == 1:
        problem = None
        if canonical_hash_v1(row) != row.get("hash"):
            problem = "its hashed fields no longer match its hash"
        return bytes.fromhex(row["hash"]), problem
    raise Failure(f"unknown leaf_version {version!r}")


def same_instant(a, b):
    """Whether two RFC 3339 timestamps name the same instant (None: unparsable)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(a.replace("Z", "+00:00")) == datetime.fromisoformat(
            b.replace("Z", "+00:00")
        )
    except (AttributeError, ValueError):
        return None


# --- RFC 6962 / RFC 9162 ---------------------------------------------------


def leaf_hash(data):
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(leaf_hashes):
    """RFC 6962 MTH over leaf hashes, iteratively (any size)."""
    if not leaf_hashes:
        return hashlib.sha256(b"").digest()
    # Perfect subtrees on a stack, merged as in a binary counter; the
    # right edge is folded at the end (right to left).
    stack = []  # (height, hash)
    for n, h in enumerate(leaf_hashes):
        height = 0
        m = n
        while m & 1:
            _, left = stack.pop()
            h = node_hash(left, h)
            height += 1
            m >>= 1
        stack.append((height, h))
    _, root = stack.pop()
    while stack:
        _, left = stack.pop()
        root = node_hash(left, root)
    return root


def verify_inclusion(leaf, index, size, proof, root):
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        raise Failure("leaf index out of range")
    fn, sn = index, size - 1
    r = leaf_hash(leaf)
    for p in proof:
        if sn == 0:
            raise Failure("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise Failure("inclusion proof does not lead to the signed root")


# --- C2SP signed note ------------------------------------------------------


def parse_verifier(verifier):
    name, key_id_hex, key_b64 = verifier.strip().split("+", 2)
    raw = base64.b64decode(key_b64)
    if len(raw) != 33 or raw[0] != 1:
        raise Failure("verifier key is not an Ed25519 note key")
    pub = raw[1:]
    key_id = hashlib.sha256(name.encode() + b"\n\x01" + pub).digest()[:4]
    if key_id.hex() != key_id_hex:
        raise Failure("verifier key id does not match its name and key")
    return name, key_id, pub


def open_note(note, verifier):
    """(origin, size, root) of a checkpoint signed by the verifier key."""
    name, key_id, pub = verifier
    split = note.rindex("\n\n")
    body, sigs = note[: split + 1], note[split + 2 :]
    for line in sigs.splitlines():
        if not line.startswith("\u2014 "):
            raise Failure("malformed signature line")
        sig_name, blob_b64 = line[2:].split(" ")
        blob = base64.b64decode(blob_b64)
        if sig_name == name and blob[:4] == key_id:
            try:
                Ed25519PublicKey.from_public_bytes(pub).verify(blob[4:], body.encode())
            except InvalidSignature:
                raise Failure("checkpoint signature is invalid") from None
            lines = body.rstrip("\n").split("\n")
            if len(lines) < 3:
                raise Failure("checkpoint body has fewer than 3 lines")
            root = base64.b64decode(lines[2])
            if len(root) != 32:
                raise Failure("checkpoint root is not 32 bytes")
            return lines[0], int(lines[1]), root
    raise Failure(f"checkpoint carries no signature by {name}")


# --- inputs ----------------------------------------------------------------


def read_text(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def read_proofs(path):
    text = read_text(path).strip()
    try:
        v = json.loads(text)
        return v if isinstance(v, list) else [v]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--origin", required=True)
    ap.add_argument("--export")
    ap.add_argument("--proofs")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument(
        "--require-proofs",
        action="store_true",
        help="every sealed event of --export must have a proof in --proofs (a subject access export)",
    )
    args = ap.parse_args()
    problems = []
    try:
        verifier = parse_verifier(args.key)
        proofs = read_proofs(args.proofs) if args.proofs else []
        if args.checkpoint:
            note = read_text(args.checkpoint)
        elif proofs:
            note = proofs[0]["checkpoint"]
        else:
            raise Failure("give --checkpoint or --proofs")
        origin, size, root = open_note(note, verifier)
        if origin != args.origin:
            raise Failure(f"checkpoint origin {origin!r} is not the expected {args.origin!r}")
    except (Failure, OSError, ValueError, KeyError) as e:
        print(f"FAILED: {e}")
        return 1

    # 1. Every exported sealed event's leaf, recomputed.
    leaves = {}  # leaf index -> (event, leaf data)
    rows = 0
    if args.export:
        for n, line in enumerate(read_text(args.export).splitlines(), 1):
            if not line.strip():
                continue
            rows += 1
            row = json.loads(line)
            event = row.get("idempotency_key") or row.get("event_id")
            index = row.get("leaf_index")
            if index is None:
                continue  # not sealed yet
            try:
                data, problem = leaf_data(row)
            except (Failure, ValueError, TypeError, AttributeError) as e:
                problems.append(f"event {event} (line {n}): {e}")
                continue
            if problem:
                problems.append(f"event {event} (leaf {index}): {problem}")
            if index in leaves:
                problems.append(f"leaf {index} is claimed by events {leaves[index][0]} and {event}")
            leaves[index] = (event, data)
    computed_root = None
    covered = all(i in leaves for i in range(size)) if leaves else False
    if covered:
        computed_root = merkle_root([leaf_hash(leaves[i][1]) for i in range(size)])
        if computed_root != root:
            problems.append(
                f"root recomputed from the export ({computed_root.hex()}) differs from the "
                f"signed root ({root.hex()}) at size {size}"
            )

    # 2. Every proof: signature, origin, size, leaf against the export, path.
    for p in proofs:
        event = p.get("event")
        try:
            p_origin, p_size, p_root = open_note(p["checkpoint"], verifier)
            if p_origin != origin:
                raise Failure(f"proof's checkpoint origin {p_origin!r} is not {origin!r}")
            if p_size != p["treeSize"]:
                raise Failure("proof's tree size differs from its signed checkpoint")
            version = p.get("leafVersion", 1)
            data = bytes.fromhex(p["recordDigest"] if version == 2 else p["eventHash"])
            if version == 2:
                # The printed record must give the leaf, and what the proof
                # prints about the event must be the record's.
                record = p.get("record")
                if not isinstance(record, dict):
                    raise Failure("a leaf v2 proof must carry its record")
                if hashlib.sha256(RECORD_PREFIX_V2 + jcs(record).encode("utf-8")).digest() != data:
                    raise Failure("the record in the proof does not give its recordDigest")
                for key, member in (("event", "idempotencyKey"), ("eventHash", "hash")):
                    if p.get(key) != record.get(member):
                        raise Failure(f"the proof's {key} is not its record's {member}")
                if same_instant(p.get("eventTime"), record.get("eventTime")) is not True:
                    raise Failure("the proof's eventTime is not its record's")
                if p.get("rowId") is not None:
                    raise Failure("a leaf v2 proof cannot prove a row id")
            index = p["leafIndex"]
            if index in leaves:
                exported_event, exported = leaves[index]
                if exported != data:
                    raise Failure(
                        f"the exported record of leaf {index} ({exported_event}) does not give "
                        "the proof's leaf"
                    )
                if exported_event != event:
                    raise Failure(f"leaf {index} is event {exported_event} in the export")
            verify_inclusion(data, index, p_size, [bytes.fromhex(h) for h in p["inclusionProof"]], p_root)
        except (Failure, KeyError, ValueError, TypeError) as e:
            problems.append(f"proof of event {event}: {e}")

    # 3. With --require-proofs: no sealed exported event without its proof.
    proven = {p.get("leafIndex") for p in proofs}
    unproven = sorted(i for i in leaves if i not in proven)
    if args.require_proofs:
        for i in unproven:
            problems.append(f"event {leaves[i][0]} (leaf {i}) has no proof in --proofs")

    summary = {
        "origin": origin,
        "size": size,
        "signedRoot": root.hex(),
        "exportRows": rows,
        "leavesRecomputed": len(leaves),
        "rootRecomputed": computed_root.hex() if computed_root else None,
        "proofsChecked": len(proofs),
        "sealedWithoutProof": len(unproven),
        "problems": problems,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    for problem in problems:
        print(f"FAILED: {problem}")
    if problems:
        return 1
    if not args.json:
        root_note = (
            f"root {computed_root.hex()} recomputed from {len(leaves)} leaves matches"
            if computed_root
            else f"{len(leaves)} leaves recomputed (the export does not hold all {size}: root not recomputed);"
        )
        print(f"OK: {root_note} the checkpoint of {origin} at size {size}; {len(proofs)} proofs verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
