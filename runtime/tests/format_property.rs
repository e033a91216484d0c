//! Property-style checks over many random hostile inputs: `parse` and `verify` never panic,
//! every cut that is not a level end is rejected, and every single changed byte anywhere in
//! the file is detected by `parse` or `verify`.

mod format_common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use format_common::*;
use matformer::format::{DType, FileView};

/// Parses and, on success, verifies; panics (failing the test) with `what` on a panic inside.
/// Returns whether the input was accepted.
fn accepted(bytes: &[u8], what: &str) -> bool {
    match catch_unwind(AssertUnwindSafe(|| FileView::parse(bytes).and_then(|v| v.verify(bytes)))) {
        Ok(r) => r.is_ok(),
        Err(_) => panic!("panic on {what}"),
    }
}

#[test]
fn random_truncations_are_rejected_unless_at_a_level_end() {
    let (_m, _s, bytes) = small_file(DType::F16);
    let view = FileView::parse(&bytes).unwrap();
    let mut rng = Rng(1);
    for _ in 0..3000 {
        let len = rng.below(bytes.len() as u64 + 1) as usize;
        let ok = accepted(&bytes[..len], &format!("cut at {len}"));
        assert_eq!(ok, view.level_ends.contains(&(len as u64)), "cut at {len}");
    }
}

#[test]
fn every_header_byte_flip_is_detected() {
    let (_m, _s, bytes) = small_file(DType::F16);
    let view = FileView::parse(&bytes).unwrap();
    let mut b = bytes.clone();
    for at in 0..view.header_len as usize {
        for mask in [0x01u8, 0x80, 0xff] {
            b[at] ^= mask;
            assert!(
                !accepted(&b, &format!("flip {mask:#x} at {at}")),
                "flip {mask:#x} at header byte {at} not detected"
            );
            b[at] ^= mask;
        }
    }
}

#[test]
fn every_data_byte_flip_is_detected() {
    // 4 KiB alignment keeps this exhaustive loop over every byte of the file fast: each
    // iteration parses the header and verifies the whole file.
    let (_m, _s, bytes) = small_file(DType::F16);
    let view = FileView::parse(&bytes).unwrap();
    let mut b = bytes.clone();
    let mut rng = Rng(2);
    // Every segment's first, middle and last byte, and random bytes of the padding.
    let mut positions = Vec::new();
    for t in &view.tensors {
        for s in &t.segments {
            positions.extend([s.offset, s.offset + s.byte_len / 2, s.end() - 1]);
        }
    }
    for _ in 0..500 {
        positions.push(view.header_len + rng.below(view.file_len - view.header_len));
    }
    for at in positions {
        let at = at as usize;
        let mask = 1u8 << rng.below(8);
        b[at] ^= mask;
        assert!(!accepted(&b, &format!("flip at {at}")), "flip {mask:#x} at byte {at} not detected");
        b[at] ^= mask;
    }
    assert!(accepted(&b, "original"));
}

#[test]
fn random_single_byte_flips_anywhere_are_detected() {
    let (_m, _s, bytes) = small_file(DType::F32);
    let mut rng = Rng(3);
    let mut b = bytes.clone();
    for _ in 0..2000 {
        let at = rng.below(b.len() as u64) as usize;
        let mask = (rng.below(255) + 1) as u8;
        b[at] ^= mask;
        assert!(!accepted(&b, &format!("flip {mask:#x} at {at}")), "flip {mask:#x} at {at} not detected");
        b[at] ^= mask;
    }
}

#[test]
fn resealed_header_mutations_never_panic() {
    // Mutate the header and re-seal its CRC so the deeper checks run on garbage.
    let (_m, _s, bytes) = small_file(DType::F16);
    let map = Map::of(&bytes);
    let mut rng = Rng(4);
    let interesting = [0u64, 1, 2, 3, 4095, 4096, 4097, 1 << 32, 1 << 40, 1 << 60, u64::MAX - 1, u64::MAX];
    for i in 0..20_000 {
        let mut b = bytes.clone();
        let n_mut = 1 + rng.below(4);
        for _ in 0..n_mut {
            match rng.below(4) {
                // A random byte of the header, after the CRC field.
                0 => {
                    let at = 52 + rng.below(map.header_len as u64 - 52) as usize;
                    b[at] = rng.next() as u8;
                }
                // A u64 field of a segment record set to an interesting value.
                1 => {
                    let r = &map.recs[rng.below(map.recs.len() as u64) as usize];
                    let s = r.segs[rng.below(r.segs.len() as u64) as usize];
                    let f = [SEG_ROW_START, SEG_ROW_END, SEG_OFFSET, SEG_LEN][rng.below(4) as usize];
                    wr_u64(&mut b, s + f, interesting[rng.below(interesting.len() as u64) as usize]);
                }
                // A shape dimension.
                2 => {
                    let r = &map.recs[rng.below(map.recs.len() as u64) as usize];
                    let d = rng.below(u64::from(b[r.ndim_at])) as usize;
                    wr_u64(&mut b, r.shape_at + 8 * d, interesting[rng.below(interesting.len() as u64) as usize]);
                }
                // A preamble or level-table field.
                _ => {
                    let at = [4usize, 8, 12, 16, 20, 24, 32, 40, 64, 72, 80][rng.below(11) as usize];
                    if at >= 24 {
                        wr_u64(&mut b, at, interesting[rng.below(interesting.len() as u64) as usize]);
                    } else {
                        wr_u32(&mut b, at, interesting[rng.below(interesting.len() as u64) as usize] as u32);
                    }
                }
            }
        }
        let _ = format_common::reseal_if_possible(&mut b);
        let cut = if rng.below(4) == 0 { rng.below(b.len() as u64 + 1) as usize } else { b.len() };
        accepted(&b[..cut], &format!("mutation {i}"));
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng(5);
    for i in 0..2000 {
        let len = rng.below(400) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if len >= 4 && rng.below(2) == 0 {
            b[..4].copy_from_slice(b"MATF");
            if len >= 8 {
                b[4..8].copy_from_slice(&1u32.to_le_bytes());
            }
            let _ = format_common::reseal_if_possible(&mut b);
        }
        accepted(&b, &format!("garbage {i}"));
    }
}
