//! Signed checkpoints in the C2SP formats (<https://c2sp.org/signed-note>,
//! <https://c2sp.org/tlog-checkpoint>).
//!
//! Each snapshot of the audit log publishes its tree size and root as a
//! checkpoint signed with Ed25519 (see README "Snapshots"), so that anyone can
//! check it with existing note tools. A checkpoint note looks like:
//!
//! ```text
//! <origin>\n<size>\n<base64 root>\n
//! \n
//! — <key name> <base64(key id (4 bytes) || signature (64 bytes))>\n
//! ```
//!
//! The signature covers the body (the first three lines, newlines included).
//! Nothing here performs I/O; signing goes through the small
//! [`CheckpointSigner`] trait so that a KMS-backed signer can be added later.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use rand::RngCore as _;
use sha2::{Digest, Sha256};

/// Algorithm byte for Ed25519 keys in the signed-note key formats.
const ALG_ED25519: u8 = 0x01;
/// Start of every signature line: U+2014 EM DASH and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Prefix of the signed-note private key format.
const PRIVATE_KEY_PREFIX: &str = "PRIVATE+KEY+";
/// Cap on signature lines, as in Go's `note.Open`, so that a hostile note
/// cannot make us parse forever.
const MAX_SIGNATURES: usize = 100;

/// Why a checkpoint could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The signer's key name cannot appear in a note (empty, or contains
    /// whitespace, `+` or control characters).
    #[error("signer key name is not a valid note key name")]
    InvalidKeyName,
    /// The signing backend (for example a KMS) failed.
    #[error("signing backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// Why a signer or verifier key string was rejected. Never carries key
/// material, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The string does not have the expected `+`-separated fields.
    #[error("malformed key string: {0}")]
    Malformed(&'static str),
    /// The key name is empty or contains whitespace, `+` or control characters.
    #[error("invalid key name")]
    InvalidName,
    /// The key is not an Ed25519 key (algorithm byte 0x01).
    #[error("unsupported key algorithm {0:#04x}")]
    UnsupportedAlgorithm(u8),
    /// The key has the wrong length for Ed25519.
    #[error("key has the wrong length for Ed25519")]
    WrongKeyLength,
    /// The key id in the string does not match the name and key.
    #[error("key id does not match the key name and key")]
    KeyIdMismatch,
    /// The public key is not a usable Ed25519 point.
    #[error("invalid Ed25519 public key")]
    InvalidPublicKey,
    /// The operating system's random number generator failed.
    #[error("the OS random number generator failed")]
    RandomSource,
}

/// Why a checkpoint note was rejected or a checkpoint could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// The note is not a well-formed signed note.
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    /// The note carries no signature by the verifier's key.
    #[error("note has no signature by key {0:?}")]
    MissingSignature(String),
    /// A signature by the verifier's key is present but wrong.
    #[error("invalid signature by key {0:?}")]
    InvalidSignature(String),
    /// The signed body is not a valid checkpoint.
    #[error("malformed checkpoint body: {0}")]
    MalformedBody(&'static str),
    /// The origin is empty or contains control characters (such as newlines).
    #[error("invalid checkpoint origin")]
    InvalidOrigin,
}

/// Anything that can sign checkpoint bodies for one note key; kept small so
/// a KMS- or HSM-backed signer can implement it later.
pub trait CheckpointSigner {
    /// The key name written in the signature line (must be a valid note key
    /// name: non-empty, no whitespace, no `+`).
    fn key_name(&self) -> &str;
    /// The 4-byte key id written before the signature (see [`ed25519_key_id`]).
    fn key_id(&self) -> [u8; 4];
    /// Signs `msg` with Ed25519.
    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], SignError>;
}

/// Key id of an Ed25519 note key: the first 4 bytes of
/// `SHA-256(name || 0x0A || 0x01 || public key)`; exposed so other signer
/// implementations (for example KMS-backed ones) can compute it.
pub fn ed25519_key_id(name: &str, public_key: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(public_key);
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// Note key names: non-empty, no Unicode whitespace, no `+` (the key string
/// separator) and, beyond the spec, no control characters, which a note
/// could not carry anyway.
fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// Splits `<name>+<8 hex key id>+<base64(0x01 || 32-byte key)>` and checks
/// everything except that the key id matches (which needs the public key).
fn parse_key_fields(s: &str) -> Result<(&str, [u8; 4], [u8; 32]), KeyError> {
    // Names cannot contain '+', but base64 can: split into at most 3 fields.
    let mut fields = s.splitn(3, '+');
    let (Some(name), Some(id_hex), Some(key_b64)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(KeyError::Malformed("expected name+keyid+key"));
    };
    if !is_valid_key_name(name) {
        return Err(KeyError::InvalidName);
    }
    let mut id = [0u8; 4];
    if id_hex.len() != 8 || hex::decode_to_slice(id_hex, &mut id).is_err() {
        return Err(KeyError::Malformed("key id must be 8 hex digits"));
    }
    let raw = BASE64
        .decode(key_b64)
        .map_err(|_| KeyError::Malformed("key is not canonical base64"))?;
    let (&alg, key) = raw.split_first().ok_or(KeyError::Malformed("empty key"))?;
    if alg != ALG_ED25519 {
        return Err(KeyError::UnsupportedAlgorithm(alg));
    }
    let key: [u8; 32] = key.try_into().map_err(|_| KeyError::WrongKeyLength)?;
    Ok((name, id, key))
}

/// Formats the common `<name>+<hex id>+<base64(0x01 || key)>` tail.
fn format_key_fields(name: &str, id: [u8; 4], key: &[u8; 32]) -> String {
    let mut raw = Vec::with_capacity(33);
    raw.push(ALG_ED25519);
    raw.extend_from_slice(key);
    format!("{name}+{}+{}", hex::encode(id), BASE64.encode(&raw))
}

/// Ed25519 checkpoint signer holding the key in memory; the default signer
/// until a KMS-backed one exists. Its `Debug` output never shows the seed.
pub struct Ed25519NoteSigner {
    name: String,
    key_id: [u8; 4],
    key: SigningKey,
}

impl Ed25519NoteSigner {
    /// Builds a signer from a 32-byte Ed25519 seed (the RFC 8032 secret key).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Self, KeyError> {
        if !is_valid_key_name(name) {
            return Err(KeyError::InvalidName);
        }
        let key = SigningKey::from_bytes(seed);
        let key_id = ed25519_key_id(name, key.verifying_key().as_bytes());
        Ok(Self {
            name: name.to_owned(),
            key_id,
            key,
        })
    }

    /// Parses the signed-note private key format
    /// `PRIVATE+KEY+<name>+<8 hex key id>+<base64(0x01 || seed)>`, as made by
    /// Go's `note.GenerateKey`; this is how the key is configured.
    pub fn from_key_string(s: &str) -> Result<Self, KeyError> {
        let rest = s
            .strip_prefix(PRIVATE_KEY_PREFIX)
            .ok_or(KeyError::Malformed("expected PRIVATE+KEY+ prefix"))?;
        let (name, id, seed) = parse_key_fields(rest)?;
        let signer = Self::from_seed(name, &seed)?;
        if signer.key_id != id {
            return Err(KeyError::KeyIdMismatch);
        }
        Ok(signer)
    }

    /// Generates a fresh key from the OS random number generator, for key
    /// set-up tooling.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut seed)
            .map_err(|_| KeyError::RandomSource)?;
        Self::from_seed(name, &seed)
    }

    /// The matching verifier, to publish or to check our own notes.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// The private key string accepted by [`Ed25519NoteSigner::from_key_string`],
    /// for key set-up tooling. It contains the secret seed: never log it.
    pub fn to_private_key_string(&self) -> String {
        let tail = format_key_fields(&self.name, self.key_id, self.key.as_bytes());
        format!("{PRIVATE_KEY_PREFIX}{tail}")
    }
}

impl CheckpointSigner for Ed25519NoteSigner {
    fn key_name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], SignError> {
        Ok(self.key.sign(msg).to_bytes())
    }
}

impl fmt::Debug for Ed25519NoteSigner {
    /// Shows the name, key id and public key; the seed is redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ed25519NoteSigner")
            .field("name", &self.name)
            .field("key_id", &hex::encode(self.key_id))
            .field(
                "public_key",
                &hex::encode(self.key.verifying_key().as_bytes()),
            )
            .field("seed", &"<redacted>")
            .finish()
    }
}

/// A trusted note verifier key, parsed from the published
/// `<name>+<8 hex key id>+<base64(0x01 || public key)>` string; used to
/// open checkpoint notes.
#[derive(Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key_id: [u8; 4],
    key: VerifyingKey,
}

impl NoteVerifier {
    /// Parses a verifier key string, checking that the key id matches.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, id, public) = parse_key_fields(s)?;
        let key = VerifyingKey::from_bytes(&public).map_err(|_| KeyError::InvalidPublicKey)?;
        // Small-order keys would let anyone forge signatures.
        if key.is_weak() {
            return Err(KeyError::InvalidPublicKey);
        }
        if ed25519_key_id(name, &public) != id {
            return Err(KeyError::KeyIdMismatch);
        }
        Ok(Self {
            name: name.to_owned(),
            key_id: id,
            key,
        })
    }

    /// The key name that signature lines must carry.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id that signatures must start with.
    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Checks an Ed25519 signature (64 bytes, without the key id) over `msg`,
    /// using strict verification (no malleable or small-order signatures).
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 64]>::try_from(signature) else {
            return false;
        };
        self.key
            .verify_strict(msg, &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

impl FromStr for NoteVerifier {
    type Err = KeyError;

    /// Same as [`NoteVerifier::parse`].
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::parse(s)
    }
}

impl fmt::Display for NoteVerifier {
    /// Formats the verifier key string, the inverse of [`NoteVerifier::parse`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_key_fields(
            &self.name,
            self.key_id,
            self.key.as_bytes(),
        ))
    }
}

impl fmt::Debug for NoteVerifier {
    /// Public material only, shown in the key string format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NoteVerifier")
            .field(&self.to_string())
            .finish()
    }
}

/// A tlog checkpoint: the log's identity, its size and its root hash at one
/// snapshot. Fields are private so every value is valid to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    origin: String,
    size: u64,
    root: [u8; 32],
}

/// Origins are a single non-empty line without control characters.
fn is_valid_origin(origin: &str) -> bool {
    !origin.is_empty() && !origin.chars().any(char::is_control)
}

impl Checkpoint {
    /// Builds a checkpoint, rejecting origins that would break the note
    /// format (empty, or containing newlines or other control characters).
    pub fn new(origin: impl Into<String>, size: u64, root: [u8; 32]) -> Result<Self, NoteError> {
        let origin = origin.into();
        if !is_valid_origin(&origin) {
            return Err(NoteError::InvalidOrigin);
        }
        Ok(Self { origin, size, root })
    }

    /// The log identity (first body line).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The tree size (number of leaves).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RFC 6962 root hash of the tree.
    pub fn root(&self) -> &[u8; 32] {
        &self.root
    }

    /// The signed text: `<origin>\n<size>\n<base64 root>\n`.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root)
        )
    }

    /// Signs the body and returns the complete signed note, ready to publish.
    pub fn sign(&self, signer: &dyn CheckpointSigner) -> Result<String, SignError> {
        let name = signer.key_name();
        if !is_valid_key_name(name) {
            return Err(SignError::InvalidKeyName);
        }
        let body = self.body();
        let signature = signer.sign(body.as_bytes())?;
        let mut blob = Vec::with_capacity(68);
        blob.extend_from_slice(&signer.key_id());
        blob.extend_from_slice(&signature);
        Ok(format!(
            "{body}\n{SIG_PREFIX}{name} {}\n",
            BASE64.encode(&blob)
        ))
    }

    /// Parses a signed body; private so that only verified text is parsed.
    fn parse_body(text: &str) -> Result<Self, NoteError> {
        let text = text
            .strip_suffix('\n')
            .ok_or(NoteError::MalformedBody("body must end with a newline"))?;
        let mut lines = text.split('\n');
        let (Some(origin), Some(size), Some(root), None) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(NoteError::MalformedBody(
                "expected exactly three lines: origin, size, root",
            ));
        };
        if !is_valid_origin(origin) {
            return Err(NoteError::MalformedBody("invalid origin"));
        }
        let canonical_size = !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
            && (size == "0" || !size.starts_with('0'));
        if !canonical_size {
            return Err(NoteError::MalformedBody(
                "size must be a canonical decimal number",
            ));
        }
        let size = size
            .parse::<u64>()
            .map_err(|_| NoteError::MalformedBody("size does not fit in 64 bits"))?;
        let root_bytes = BASE64
            .decode(root)
            .map_err(|_| NoteError::MalformedBody("root is not canonical base64"))?;
        let root: [u8; 32] = root_bytes
            .try_into()
            .map_err(|_| NoteError::MalformedBody("root hash must be 32 bytes"))?;
        Self::new(origin, size, root)
    }
}

/// Opens a checkpoint note: checks its structure, requires at least one
/// signature line by `verifier`'s key name and id, verifies every such line,
/// then parses the body. Signatures by other keys (for example witness
/// cosignatures) must be well-formed but are otherwise ignored, as the
/// signed-note spec asks. Never panics, whatever the input.
pub fn open_note(note: &str, verifier: &NoteVerifier) -> Result<Checkpoint, NoteError> {
    if note.chars().any(|c| c < '\u{20}' && c != '\n') {
        return Err(NoteError::Malformed(
            "control characters other than newline",
        ));
    }
    // The signature block follows the last blank line (signature lines are
    // never empty, so the last "\n\n" is the separator).
    let split = note
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no blank line before signatures"))?;
    let (text, sigs) = (&note[..=split], &note[split + 2..]);
    let sigs = sigs.strip_suffix('\n').ok_or(NoteError::Malformed(
        "signature block must end with newline",
    ))?;
    if sigs.is_empty() {
        return Err(NoteError::Malformed("no signature lines"));
    }

    let mut verified = false;
    for (count, line) in sigs.split('\n').enumerate() {
        if count >= MAX_SIGNATURES {
            return Err(NoteError::Malformed("too many signatures"));
        }
        let rest = line.strip_prefix(SIG_PREFIX).ok_or(NoteError::Malformed(
            "signature line must start with an em dash",
        ))?;
        let (name, sig_b64) = rest.split_once(' ').ok_or(NoteError::Malformed(
            "signature line needs a name and a signature",
        ))?;
        if !is_valid_key_name(name) {
            return Err(NoteError::Malformed("invalid key name in signature line"));
        }
        let blob = BASE64
            .decode(sig_b64)
            .map_err(|_| NoteError::Malformed("signature is not canonical base64"))?;
        if blob.len() < 5 {
            return Err(NoteError::Malformed("signature too short"));
        }
        let (id, signature) = blob.split_at(4);
        if name != verifier.name || id != verifier.key_id {
            continue; // Another key's signature: allowed, not trusted.
        }
        if !verifier.verify(text.as_bytes(), signature) {
            return Err(NoteError::InvalidSignature(verifier.name.clone()));
        }
        verified = true;
    }
    if !verified {
        return Err(NoteError::MissingSignature(verifier.name.clone()));
    }
    Checkpoint::parse_body(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VECTORS: &str = include_str!("../../tests/fixtures/integrity-vectors.json");

    struct Fixture {
        seed: [u8; 32],
        public: [u8; 32],
        rfc8032_sig: Vec<u8>,
        key_name: String,
        verifier_key: String,
        size: u64,
        root: [u8; 32],
        note: String,
    }

    fn fixture() -> Fixture {
        let v: serde_json::Value = serde_json::from_str(VECTORS).expect("fixture is JSON");
        let hex32 = |x: &serde_json::Value| -> [u8; 32] {
            hex::decode(x.as_str().expect("string"))
                .expect("hex")
                .try_into()
                .expect("32 bytes")
        };
        let s = |x: &serde_json::Value| x.as_str().expect("string").to_owned();
        let ed = &v["ed25519"];
        let cp = &v["signedNoteCheckpoint"];
        assert_eq!(ed["messageHex"], "");
        Fixture {
            seed: hex32(&ed["secretKeyHex"]),
            public: hex32(&ed["publicKeyHex"]),
            rfc8032_sig: hex::decode(s(&ed["signatureHex"])).expect("hex"),
            key_name: s(&cp["keyName"]),
            verifier_key: s(&cp["verifierKey"]),
            size: cp["treeSize"].as_u64().expect("u64"),
            root: hex32(&cp["rootHashHex"]),
            note: s(&cp["note"]),
        }
    }

    fn fixture_signer() -> (Fixture, Ed25519NoteSigner) {
        let f = fixture();
        let signer = Ed25519NoteSigner::from_seed(&f.key_name, &f.seed).unwrap();
        (f, signer)
    }

    /// Signs arbitrary text as a note, to test what happens to well-signed
    /// but malformed bodies.
    fn sign_text(signer: &dyn CheckpointSigner, text: &str) -> String {
        let sig = signer.sign(text.as_bytes()).unwrap();
        let blob = [&signer.key_id()[..], &sig[..]].concat();
        format!(
            "{text}\n\u{2014} {} {}\n",
            signer.key_name(),
            BASE64.encode(blob)
        )
    }

    #[test]
    fn rfc8032_test_1() {
        let (f, signer) = fixture_signer();
        assert_eq!(signer.verifier().public_key(), f.public);
        let sig = CheckpointSigner::sign(&signer, b"").unwrap();
        assert_eq!(sig.to_vec(), f.rfc8032_sig);
        assert!(signer.verifier().verify(b"", &sig));
        assert!(!signer.verifier().verify(b"x", &sig));
        assert!(!signer.verifier().verify(b"", &sig[..63]));
    }

    #[test]
    fn fixture_verifier_key_from_secret() {
        let (f, signer) = fixture_signer();
        assert_eq!(signer.verifier().to_string(), f.verifier_key);
        assert_eq!(signer.key_id(), [0xa2, 0x1a, 0xfb, 0x2a]);
        assert_eq!(ed25519_key_id(&f.key_name, &f.public), signer.key_id());
        let parsed = NoteVerifier::parse(&f.verifier_key).unwrap();
        assert_eq!(parsed, signer.verifier());
        assert_eq!(parsed.name(), f.key_name);
    }

    #[test]
    fn fixture_note_byte_for_byte() {
        let (f, signer) = fixture_signer();
        let cp = Checkpoint::new(f.key_name.clone(), f.size, f.root).unwrap();
        let note = cp.sign(&signer).unwrap();
        assert_eq!(note.as_bytes(), f.note.as_bytes());
        assert!(note.starts_with(&cp.body()));
    }

    #[test]
    fn open_fixture_note() {
        let f = fixture();
        let verifier = NoteVerifier::parse(&f.verifier_key).unwrap();
        let cp = open_note(&f.note, &verifier).unwrap();
        assert_eq!(cp.origin(), "audit.example/log");
        assert_eq!(cp.size(), 8);
        assert_eq!(cp.root(), &f.root);
    }

    #[test]
    fn fixture_note_rejected_with_any_byte_changed() {
        let f = fixture();
        let verifier = NoteVerifier::parse(&f.verifier_key).unwrap();
        let bytes = f.note.as_bytes();
        let mut tried = 0;
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80] {
                let mut changed = bytes.to_vec();
                changed[i] ^= mask;
                // Invalid UTF-8 cannot even reach open_note.
                if let Ok(s) = std::str::from_utf8(&changed) {
                    tried += 1;
                    assert!(
                        open_note(s, &verifier).is_err(),
                        "accepted with byte {i} xor {mask:#04x}"
                    );
                }
            }
        }
        assert!(tried > 8 * 100);
    }

    #[test]
    fn fixture_note_rejected_when_truncated_or_extended() {
        let f = fixture();
        let verifier = NoteVerifier::parse(&f.verifier_key).unwrap();
        for end in 0..f.note.len() {
            if let Some(prefix) = f.note.get(..end) {
                assert!(open_note(prefix, &verifier).is_err(), "prefix of {end}");
            }
        }
        // Signature shortened by one base64 quantum (three bytes), newline kept.
        let sig_start = f.note.rfind(' ').unwrap() + 1;
        let short = format!("{}\n", &f.note[..f.note.len() - 5]);
        assert_eq!(
            open_note(&short, &verifier),
            Err(NoteError::InvalidSignature(f.key_name.clone()))
        );
        let body_only = &f.note[..sig_start - 1];
        assert!(open_note(body_only, &verifier).is_err());
        // Junk after the signature block.
        for junk in ["\n", "x", "x\n", " \n", "\u{2014} \n"] {
            let extended = format!("{}{junk}", f.note);
            assert!(open_note(&extended, &verifier).is_err(), "junk {junk:?}");
        }
        // A signature of the wrong length carrying the right key id.
        let blob = BASE64.decode(&f.note[sig_start..f.note.len() - 1]).unwrap();
        let truncated = format!(
            "{}{}\n",
            &f.note[..sig_start],
            BASE64.encode(&blob[..blob.len() - 1])
        );
        assert_eq!(
            open_note(&truncated, &verifier),
            Err(NoteError::InvalidSignature(f.key_name.clone()))
        );
    }

    #[test]
    fn fixture_note_rejected_with_another_key() {
        let f = fixture();
        let same_name = Ed25519NoteSigner::from_seed(&f.key_name, &[7; 32]).unwrap();
        let other_name = Ed25519NoteSigner::from_seed("other.example/log", &f.seed).unwrap();
        for signer in [&same_name, &other_name] {
            assert_eq!(
                open_note(&f.note, &signer.verifier()),
                Err(NoteError::MissingSignature(signer.key_name().to_owned()))
            );
        }
        // The other key's note is not accepted by the fixture verifier.
        let fixture_verifier = NoteVerifier::parse(&f.verifier_key).unwrap();
        let cp = Checkpoint::new(f.key_name.clone(), f.size, f.root).unwrap();
        let forged = cp.sign(&same_name).unwrap();
        assert!(open_note(&forged, &fixture_verifier).is_err());
        // Same key id and name, but a signature made by another key.
        let sig = CheckpointSigner::sign(&same_name, cp.body().as_bytes()).unwrap();
        let blob = [&fixture_verifier.key_id()[..], &sig[..]].concat();
        let spliced = format!(
            "{}\n\u{2014} {} {}\n",
            cp.body(),
            f.key_name,
            BASE64.encode(blob)
        );
        assert_eq!(
            open_note(&spliced, &fixture_verifier),
            Err(NoteError::InvalidSignature(f.key_name.clone()))
        );
    }

    #[test]
    fn cosigned_notes_open_with_either_key() {
        let (f, signer) = fixture_signer();
        let witness = Ed25519NoteSigner::from_seed("witness.example", &[9; 32]).unwrap();
        let cp = Checkpoint::new(f.key_name.clone(), f.size, f.root).unwrap();
        let note = cp.sign(&signer).unwrap();
        let witness_note = cp.sign(&witness).unwrap();
        let witness_line = &witness_note[cp.body().len() + 1..];
        let cosigned = format!("{note}{witness_line}");
        assert_eq!(open_note(&cosigned, &signer.verifier()).unwrap(), cp);
        assert_eq!(open_note(&cosigned, &witness.verifier()).unwrap(), cp);
        // A bad signature by the trusted key is fatal even next to a good one.
        let bad_line = witness_line.replace("witness.example", signer.key_name());
        let with_bad = format!("{note}{bad_line}");
        assert!(open_note(&with_bad, &signer.verifier()).is_ok()); // key id differs: ignored
        let mut tampered_blob = BASE64
            .decode(note[note.rfind(' ').unwrap() + 1..].trim_end())
            .unwrap();
        tampered_blob[10] ^= 1;
        let tampered_line = format!(
            "\u{2014} {} {}\n",
            signer.key_name(),
            BASE64.encode(tampered_blob)
        );
        assert_eq!(
            open_note(&format!("{note}{tampered_line}"), &signer.verifier()),
            Err(NoteError::InvalidSignature(signer.key_name().to_owned()))
        );
        let too_many = format!("{note}{}", witness_line.repeat(MAX_SIGNATURES));
        assert!(open_note(&too_many, &signer.verifier()).is_err());
    }

    #[test]
    fn malformed_bodies_are_rejected_even_when_signed() {
        let (f, signer) = fixture_signer();
        let verifier = signer.verifier();
        let root = BASE64.encode(f.root);
        let root31 = BASE64.encode(&f.root[..31]);
        let root33 = BASE64.encode([0u8; 33]);
        let root_unpadded = root.trim_end_matches('=').to_owned();
        // Same 32 bytes but non-zero trailing bits in the last character.
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut root_loose = root.clone().into_bytes();
        let last = ALPHABET.iter().position(|&c| c == root_loose[42]).unwrap();
        root_loose[42] = ALPHABET[last | 1];
        let root_loose = String::from_utf8(root_loose).unwrap();
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        );
        assert_eq!(lenient.decode(&root_loose).unwrap(), f.root);
        let bad_bodies = [
            format!("o\n08\n{root}\n"),
            format!("o\n+8\n{root}\n"),
            format!("o\n-8\n{root}\n"),
            format!("o\n 8\n{root}\n"),
            format!("o\n8 \n{root}\n"),
            format!("o\n\n{root}\n"),
            format!("o\n0x8\n{root}\n"),
            format!("o\n18446744073709551616\n{root}\n"),
            format!("o\n8\n{root31}\n"),
            format!("o\n8\n{root33}\n"),
            format!("o\n8\n{root_unpadded}\n"),
            format!("o\n8\n{root_loose}\n"),
            format!("o\n8\n{root} \n"),
            format!("o\n8\n{root}\nextension line\n"),
            format!("\n8\n{root}\n"),
            "o\n8\n".to_owned(),
            "o\n".to_owned(),
            format!("o\u{7f}\n8\n{root}\n"),
        ];
        for body in &bad_bodies {
            let note = sign_text(&signer, body);
            assert!(
                matches!(
                    open_note(&note, &verifier),
                    Err(NoteError::MalformedBody(_))
                ),
                "accepted body {body:?}"
            );
        }
        // The boundaries that must be accepted.
        for (size, text) in [(0u64, "0"), (u64::MAX, "18446744073709551615")] {
            let note = sign_text(&signer, &format!("o\n{text}\n{root}\n"));
            let cp = open_note(&note, &verifier).unwrap();
            assert_eq!((cp.size(), cp.root()), (size, &f.root));
        }
    }

    #[test]
    fn checkpoint_round_trip_and_origin_rules() {
        let signer = Ed25519NoteSigner::generate("log.example/a").unwrap();
        for (origin, size) in [("log.example/a", 0u64), ("x", 1), ("a b/ü", u64::MAX)] {
            let cp = Checkpoint::new(origin, size, [size as u8; 32]).unwrap();
            let note = cp.sign(&signer).unwrap();
            assert_eq!(open_note(&note, &signer.verifier()).unwrap(), cp);
        }
        for origin in ["", "a\nb", "a\rb", "tab\t", "del\u{7f}", "c1\u{85}"] {
            assert_eq!(
                Checkpoint::new(origin, 1, [0; 32]),
                Err(NoteError::InvalidOrigin)
            );
        }
    }

    #[test]
    fn sign_reports_bad_names_and_backend_errors() {
        struct Failing(&'static str);
        impl CheckpointSigner for Failing {
            fn key_name(&self) -> &str {
                self.0
            }
            fn key_id(&self) -> [u8; 4] {
                [0; 4]
            }
            fn sign(&self, _: &[u8]) -> Result<[u8; 64], SignError> {
                Err(SignError::Backend("kms unavailable".into()))
            }
        }
        let cp = Checkpoint::new("o", 1, [0; 32]).unwrap();
        assert!(matches!(
            cp.sign(&Failing("ok")),
            Err(SignError::Backend(_))
        ));
        for name in ["", "a b", "a+b", "a\nb"] {
            assert!(matches!(
                cp.sign(&Failing(name)),
                Err(SignError::InvalidKeyName)
            ));
        }
    }

    #[test]
    fn key_strings_round_trip() {
        let (f, signer) = fixture_signer();
        let private = signer.to_private_key_string();
        assert!(private.starts_with("PRIVATE+KEY+audit.example/log+a21afb2a+"));
        let again = Ed25519NoteSigner::from_key_string(&private).unwrap();
        assert_eq!(again.verifier(), signer.verifier());
        assert_eq!(again.to_private_key_string(), private);
        let cp = Checkpoint::new(f.key_name.clone(), f.size, f.root).unwrap();
        assert_eq!(cp.sign(&again).unwrap(), f.note);

        for _ in 0..8 {
            let fresh = Ed25519NoteSigner::generate("fresh.example/log").unwrap();
            let v = fresh.verifier();
            assert_eq!(NoteVerifier::parse(&v.to_string()).unwrap(), v);
            assert_eq!(v.to_string().parse::<NoteVerifier>().unwrap(), v);
            let s = Ed25519NoteSigner::from_key_string(&fresh.to_private_key_string()).unwrap();
            assert_eq!(s.verifier(), v);
        }
        // Upper-case hex key ids are accepted, as by Go's strconv.ParseUint.
        let upper = f.verifier_key.replace("a21afb2a", "A21AFB2A");
        assert_eq!(
            NoteVerifier::parse(&upper).unwrap(),
            NoteVerifier::parse(&f.verifier_key).unwrap()
        );
    }

    #[test]
    fn bad_key_strings_are_rejected() {
        let (f, signer) = fixture_signer();
        let vk = f.verifier_key.as_str();
        let key_b64 = &vk["audit.example/log+a21afb2a+".len()..];
        let mut wrong_alg = BASE64.decode(key_b64).unwrap();
        wrong_alg[0] = 0x02;
        let short_key = BASE64.encode(&BASE64.decode(key_b64).unwrap()[..32]);
        let weak_key = BASE64.encode([&[1u8][..], &[0u8; 32][..]].concat()); // small-order point
        let cases: Vec<(String, KeyError)> = vec![
            (vk.replace("a21afb2a", "a21afb2b"), KeyError::KeyIdMismatch),
            (
                vk.replace("audit.example/log", "audit.example/lug"),
                KeyError::KeyIdMismatch,
            ),
            (
                vk.replace("a21afb2a", "a21afb2"),
                KeyError::Malformed("key id must be 8 hex digits"),
            ),
            (
                vk.replace("a21afb2a", "a21afb2g"),
                KeyError::Malformed("key id must be 8 hex digits"),
            ),
            (
                format!("audit.example/log+a21afb2a+{}", BASE64.encode(&wrong_alg)),
                KeyError::UnsupportedAlgorithm(2),
            ),
            (
                format!("audit.example/log+a21afb2a+{short_key}"),
                KeyError::WrongKeyLength,
            ),
            (
                format!("audit.example/log+a21afb2a+{weak_key}"),
                KeyError::InvalidPublicKey,
            ),
            (
                format!("{vk}="),
                KeyError::Malformed("key is not canonical base64"),
            ),
            (
                vk.replace("audit.example/log", "audit example"),
                KeyError::InvalidName,
            ),
            (vk.replace("audit.example/log", ""), KeyError::InvalidName),
            (
                "audit.example/log+a21afb2a".to_owned(),
                KeyError::Malformed("expected name+keyid+key"),
            ),
            (
                "audit.example/log+a21afb2a+".to_owned(),
                KeyError::Malformed("empty key"),
            ),
        ];
        for (s, expected) in cases {
            assert_eq!(NoteVerifier::parse(&s), Err(expected), "{s:?}");
        }

        let private = signer.to_private_key_string();
        assert_eq!(
            Ed25519NoteSigner::from_key_string(&private.replace("a21afb2a", "00000000"))
                .unwrap_err(),
            KeyError::KeyIdMismatch
        );
        assert!(matches!(
            Ed25519NoteSigner::from_key_string(&private["PRIVATE+KEY+".len()..]),
            Err(KeyError::Malformed(_))
        ));
        assert!(Ed25519NoteSigner::from_key_string(vk).is_err());
        assert!(Ed25519NoteSigner::from_seed("bad name", &[0; 32]).is_err());
        assert!(Ed25519NoteSigner::generate("bad+name").is_err());
    }

    #[test]
    fn debug_output_redacts_the_seed() {
        let (f, signer) = fixture_signer();
        let debug = format!("{signer:?} {:#?}", signer);
        let private = signer.to_private_key_string();
        let seed_b64 = &private[private.rfind('+').unwrap() + 1..];
        assert!(!debug.contains(&hex::encode(f.seed)));
        assert!(!debug.to_lowercase().contains(&hex::encode(f.seed)[..16]));
        assert!(!debug.contains(seed_b64));
        assert!(!debug.contains(&seed_b64[4..20]));
        assert!(debug.contains("redacted"));
        assert!(debug.contains(&hex::encode(f.public)));
        let verifier_debug = format!("{:?}", signer.verifier());
        assert!(verifier_debug.contains(&f.verifier_key));
        // Errors never echo key material either.
        let err = Ed25519NoteSigner::from_key_string(&private.replace("a21afb2a", "00000000"))
            .unwrap_err();
        assert!(!format!("{err} {err:?}").contains(seed_b64));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn open_note_never_panics_on_arbitrary_text(s in "\\PC*(\n\n\u{2014} [a-z.]{0,5} [A-Za-z0-9+/=]{0,100}\n)?") {
            let verifier = NoteVerifier::parse(&fixture().verifier_key).unwrap();
            let _ = open_note(&s, &verifier);
        }

        #[test]
        fn open_note_rejects_edited_fixture(
            pos in any::<prop::sample::Index>(),
            edit in 0u8..3,
            c in any::<char>(),
        ) {
            let f = fixture();
            let verifier = NoteVerifier::parse(&f.verifier_key).unwrap();
            let mut chars: Vec<char> = f.note.chars().collect();
            let i = pos.index(chars.len());
            match edit {
                0 => { chars.insert(i, c); }
                1 => { chars.remove(i); }
                _ => {
                    prop_assume!(chars[i] != c);
                    chars[i] = c;
                }
            }
            let edited: String = chars.into_iter().collect();
            prop_assert!(open_note(&edited, &verifier).is_err(), "accepted {:?}", edited);
        }

        #[test]
        fn signed_checkpoints_round_trip(
            origin in "[!-~\u{a0}-\u{10ffff}][ -~\u{a0}-\u{3000}]{0,40}",
            size in any::<u64>(),
            root in any::<[u8; 32]>(),
            seed in any::<[u8; 32]>(),
        ) {
            let signer = Ed25519NoteSigner::from_seed("prop.example/log", &seed).unwrap();
            let cp = Checkpoint::new(origin, size, root).unwrap();
            let note = cp.sign(&signer).unwrap();
            prop_assert_eq!(open_note(&note, &signer.verifier()).unwrap(), cp);
        }
    }
}
