//! Opening signed checkpoint notes from arbitrary text: never panics, and
//! nothing opens unless it was signed by the trusted key.
#![no_main]

use audit_worker_fuzz::integrity::checkpoint::{open_note, Checkpoint, Ed25519NoteSigner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let signer = Ed25519NoteSigner::from_seed("fuzz.example/log", &[7u8; 32]).expect("key");
    let verifier = signer.verifier();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Arbitrary text: the fuzzer cannot forge an Ed25519 signature, so
    // nothing it writes may open.
    assert!(
        open_note(text, &verifier).is_err(),
        "forged note opened: {text:?}"
    );

    // A genuine note with fuzzed text appended or spliced into its body.
    let cp = Checkpoint::new(
        "fuzz.example/log",
        data.len() as u64,
        [data.len() as u8; 32],
    )
    .expect("checkpoint");
    let note = cp.sign(&signer).expect("sign");
    let opened = open_note(&note, &verifier).expect("genuine note opens");
    assert_eq!(opened.size(), cp.size());
    let tampered = format!("{}{text}", &note);
    if !text.is_empty() {
        let _ = open_note(&tampered, &verifier);
    }
    let body_end = note.find("\n\n").unwrap_or(0);
    let spliced = format!("{}{text}{}", &note[..body_end], &note[body_end..]);
    if !text.is_empty() {
        assert!(
            open_note(&spliced, &verifier).is_err(),
            "altered body opened"
        );
    }
});
