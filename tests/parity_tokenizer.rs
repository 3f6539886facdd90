//! CLIP token ids against transformers' CLIPTokenizer, for SD 1.x and SD 2.x tokenizer files.

mod common;
use common::*;
use sdgen::tokenizer::ClipTokenizer;

fn check(model: &str) {
    let tok = ClipTokenizer::from_dir(&model_dir(model).join("tokenizer")).unwrap();
    let refs = read_json(&format!("{model}/tokens.json"));
    let prompts = refs["prompts"].as_array().unwrap();
    let ids = refs["ids"].as_array().unwrap();
    assert!(prompts.len() >= 50);
    let mut failures = Vec::new();
    for (p, want) in prompts.iter().zip(ids) {
        let p = p.as_str().unwrap();
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(p).unwrap().ids;
        if got != want {
            failures.push(format!("{p:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{model}: {} prompts differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sd1_tokenizer_matches_transformers() {
    check("tiny");
}

#[test]
fn sd2_tokenizer_pads_with_exclamation_and_matches_transformers() {
    check("tiny2");
    let tok = ClipTokenizer::from_dir(&model_dir("tiny2").join("tokenizer")).unwrap();
    assert_eq!(tok.pad_id, 0);
}

#[test]
fn long_prompts_are_truncated_and_flagged() {
    let tok = ClipTokenizer::from_dir(&model_dir("tiny").join("tokenizer")).unwrap();
    let e = tok.encode(&"word ".repeat(100)).unwrap();
    assert!(e.truncated);
    assert_eq!(e.ids.len(), 77);
    assert_eq!(e.ids[76], tok.eos_id);
    assert!(!tok.encode("a cat").unwrap().truncated);
}
