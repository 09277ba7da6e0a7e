//! The RFC 6962 proof verifiers on arbitrary proofs, indices and sizes:
//! never panic, and never accept a proof that differs from the real one.
#![no_main]

use audit_worker_fuzz::integrity::merkle::{
    consistency_proof, inclusion_proof, leaf_hash, subtree_root, verify_consistency,
    verify_inclusion, Hash,
};
use libfuzzer_sys::fuzz_target;

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 24 {
        return;
    }
    let (a, b, c) = (u64_at(data, 0), u64_at(data, 8), u64_at(data, 16));
    let hashes: Vec<Hash> = data[24..]
        .chunks(32)
        .map(|ch| {
            let mut h = [0u8; 32];
            h[..ch.len()].copy_from_slice(ch);
            h
        })
        .collect();
    let (first, proof) = match hashes.split_first() {
        Some((f, p)) => (*f, p),
        None => ([0u8; 32], &[][..]),
    };

    // 1. Arbitrary everything (including huge sizes): no panic.
    let _ = verify_inclusion(&first, a, b, proof, &first);
    let _ = verify_consistency(a, b, &first, &first, proof);

    // 2. A real small tree: the genuine proof verifies, and any proof that
    //    differs from it is refused.
    let size = (c % 64) + 1;
    let leaves: Vec<Hash> = (0..size).map(|i| leaf_hash(&i.to_le_bytes())).collect();
    let root = subtree_root(leaves.iter().copied());
    let index = a % size;
    let genuine = inclusion_proof(&leaves, index).expect("index in range");
    verify_inclusion(&leaves[index as usize], index, size, &genuine, &root)
        .expect("genuine inclusion proof verifies");
    if proof != genuine.as_slice() {
        assert!(verify_inclusion(&leaves[index as usize], index, size, proof, &root).is_err());
    }
    let old = b % (size + 1);
    let old_root = subtree_root(leaves[..old as usize].iter().copied());
    let genuine = consistency_proof(&leaves, old, size).expect("sizes in order");
    verify_consistency(old, size, &old_root, &root, &genuine)
        .expect("genuine consistency proof verifies");
    if old > 0 && proof != genuine.as_slice() {
        assert!(verify_consistency(old, size, &old_root, &root, proof).is_err());
    }
});
