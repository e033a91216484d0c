//! Submodel specifications and the byte tokenizer.

use matformer::format::testing::synthetic_metadata;
use matformer::format::Metadata;
use matformer::tokenizer::{ByteTokenizer, Utf8StreamDecoder};
use matformer::{Submodel, SubmodelError};

/// 4 layers, levels s/m/l/xl with per-layer widths.
fn meta() -> Metadata {
    synthetic_metadata(
        64,
        4,
        4,
        2,
        16,
        260,
        vec![vec![8, 16, 32, 64], vec![10, 20, 40, 80], vec![12, 24, 48, 96], vec![14, 28, 56, 112]],
        true,
        false,
    )
}

#[test]
fn parses_names_indices_and_lists() {
    let m = meta();
    assert_eq!(Submodel::parse("s", &m, 4).unwrap(), Submodel::uniform(0, 4));
    assert_eq!(Submodel::parse(" XL ", &m, 4).unwrap(), Submodel::uniform(3, 4));
    assert_eq!(Submodel::parse("l", &m, 4).unwrap().levels, vec![2; 4]);
    assert_eq!(Submodel::parse("2", &m, 4).unwrap(), Submodel::uniform(2, 4));
    assert_eq!(Submodel::parse("full", &m, 4).unwrap(), Submodel::uniform(3, 4));
    assert_eq!(Submodel::parse("largest", &m, 2).unwrap(), Submodel::uniform(1, 4));
    assert_eq!(Submodel::parse("0,0,1,3", &m, 4).unwrap().levels, vec![0, 0, 1, 3]);
    assert_eq!(Submodel::parse("s, s ,m,xl", &m, 4).unwrap().levels, vec![0, 0, 1, 3]);
    assert_eq!(Submodel::parse("0,m,2,xl", &m, 4).unwrap().levels, vec![0, 1, 2, 3]);
}

#[test]
fn names_widths_and_max_level() {
    let m = meta();
    let mix = Submodel::new(vec![0, 0, 1, 3]);
    assert_eq!(mix.name(&m), "s,s,m,xl");
    assert_eq!(mix.widths(&m), vec![8, 10, 24, 112]);
    assert_eq!(mix.max_level(), 3);
    assert!(!mix.is_uniform());
    let m_uni = Submodel::uniform(1, 4);
    assert_eq!(m_uni.name(&m), "m");
    assert_eq!(m_uni.widths(&m), vec![16, 20, 24, 28]);
    assert!(m_uni.is_uniform());
    assert_eq!(Submodel::new(vec![]).max_level(), 0);
    // Every name round-trips through parse.
    for levels in [vec![0, 1, 2, 3], vec![3, 3, 3, 3], vec![2, 0, 2, 0]] {
        let s = Submodel::new(levels);
        assert_eq!(Submodel::parse(&s.name(&m), &m, 4).unwrap(), s);
    }
    // Out-of-table levels never panic.
    assert_eq!(Submodel::new(vec![9, 0, 0, 0, 0]).widths(&m), vec![64, 10, 12, 14, 0]);
    assert_eq!(Submodel::largest(&m, 4), Submodel::uniform(3, 4));
    assert_eq!(Submodel::largest(&m, 9), Submodel::uniform(3, 4));
}

#[test]
fn parse_errors() {
    let m = meta();
    match Submodel::parse("huge", &m, 4) {
        Err(SubmodelError::UnknownName { spec, known }) => {
            assert_eq!(spec, "huge");
            assert_eq!(known, "s, m, l, xl");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(Submodel::parse("", &m, 4), Err(SubmodelError::UnknownName { .. })));
    assert!(matches!(Submodel::parse("7", &m, 4), Err(SubmodelError::UnknownName { .. })));
    assert_eq!(Submodel::parse("0,1,2", &m, 4), Err(SubmodelError::WrongLayerCount { expected: 4, found: 3 }));
    assert_eq!(Submodel::parse("0,1,2,3,0", &m, 4), Err(SubmodelError::WrongLayerCount { expected: 4, found: 5 }));
    match Submodel::parse("0,1,x,3", &m, 4) {
        Err(SubmodelError::BadIndex { layer: 2, item, n_levels: 4, .. }) => assert_eq!(item, "x"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(Submodel::parse("0,-1,0,0", &m, 4), Err(SubmodelError::BadIndex { layer: 1, .. })));
    assert!(matches!(Submodel::parse("0,4,0,0", &m, 4), Err(SubmodelError::BadIndex { layer: 1, .. })));
    assert!(matches!(Submodel::parse("0,,0,0", &m, 4), Err(SubmodelError::BadIndex { layer: 1, .. })));
    assert_eq!(
        Submodel::parse("xl", &m, 2),
        Err(SubmodelError::LevelNotAvailable { layer: 0, level: 3, available: 2 })
    );
    assert_eq!(
        Submodel::parse("0,0,1,2", &m, 2),
        Err(SubmodelError::LevelNotAvailable { layer: 3, level: 2, available: 2 })
    );
    // Messages are one line and say what to do.
    for e in [
        Submodel::parse("huge", &m, 4).unwrap_err(),
        Submodel::parse("0,1", &m, 4).unwrap_err(),
        Submodel::parse("xl", &m, 1).unwrap_err(),
        Submodel::parse("0,q,0,0", &m, 4).unwrap_err(),
    ] {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.len() > 20, "{msg}");
    }
}

#[test]
fn validate_checks_layer_count_and_levels() {
    let m = meta();
    assert!(Submodel::uniform(3, 4).validate(&m, 4).is_ok());
    assert!(matches!(Submodel::uniform(0, 3).validate(&m, 4), Err(SubmodelError::WrongLayerCount { .. })));
    assert!(matches!(Submodel::new(vec![0, 0, 0, 4]).validate(&m, 4), Err(SubmodelError::BadIndex { layer: 3, .. })));
    assert!(matches!(
        Submodel::uniform(1, 4).validate(&m, 1),
        Err(SubmodelError::LevelNotAvailable { layer: 0, level: 1, available: 1 })
    ));
}

#[test]
fn submodel_serde_round_trip() {
    let s = Submodel::new(vec![0, 2, 1, 3]);
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Submodel>(&json).unwrap(), s);
}

#[test]
fn tokenizer_round_trip_and_specials() {
    let m = meta();
    let tok = ByteTokenizer::from_metadata(&m);
    assert_eq!(tok, ByteTokenizer { bos_id: Some(256), eos_id: Some(257), vocab_size: 260 });
    let text = "Hello, wörld! 日本語 🦀\n\t\0end";
    let ids = tok.encode(text, false);
    assert_eq!(ids.len(), text.len());
    assert!(ids.iter().all(|&i| i < 256));
    assert_eq!(tok.decode(&ids), text);
    let with_bos = tok.encode(text, true);
    assert_eq!(with_bos[0], 256);
    assert_eq!(&with_bos[1..], &ids[..]);
    assert_eq!(tok.decode(&with_bos), text);
    let mut mixed = vec![257, 72, 258, 105, 256];
    mixed.push(999_999);
    assert_eq!(tok.decode(&mixed), "Hi");
    assert_eq!(tok.decode_bytes(&mixed), b"Hi");
    assert!(tok.is_special(256) && !tok.is_special(255));
    assert_eq!(tok.encode("", true), vec![256]);
    assert!(tok.encode("", false).is_empty());
    // Invalid UTF-8 is replaced, never a panic.
    assert_eq!(tok.decode(&[0xff, 0x41]), "\u{fffd}A");
    let no_bos = ByteTokenizer { bos_id: None, eos_id: None, vocab_size: 256 };
    assert_eq!(no_bos.encode("a", true), vec![97]);
}

#[test]
fn stream_decoder_matches_decode() {
    let tok = ByteTokenizer { bos_id: Some(256), eos_id: Some(257), vocab_size: 260 };
    let mut state = 12345u64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let text = "añ€𝄞 ok";
    let mut cases: Vec<Vec<u32>> = vec![tok.encode(text, true), vec![0xE2, 0xE2, 0x82, 0xAC], vec![0xF0, 0x9D, 0x84]];
    for _ in 0..300 {
        let n = (next() % 12) as usize;
        // Bytes biased towards UTF-8 lead/continuation bytes, plus specials.
        cases.push(
            (0..n)
                .map(|_| match next() % 5 {
                    0 => 0x80 + next() % 0x40,
                    1 => 0xC2 + next() % 0x33,
                    2 => next() % 0x80,
                    3 => 256 + next() % 4,
                    _ => next() % 256,
                })
                .collect(),
        );
    }
    for ids in cases {
        let mut d = Utf8StreamDecoder::new();
        let mut s = String::new();
        for &id in &ids {
            s.push_str(&d.push(id));
        }
        s.push_str(&d.finish());
        assert_eq!(s, tok.decode(&ids), "{ids:?}");
    }
}
