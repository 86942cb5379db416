//! The tokenizer and prompts against the reference: Python `tokenizers` ids for varied texts, the
//! spec's special-token ids, and the exact prompt ids the official `infer` built for every fixture case.

use dsocr::model::layout::image_token_count;
use dsocr::text::prompt::{BOS_ID, EOS_ID, IMAGE_TOKEN_ID};
use dsocr::text::{Task, Tokenizer, prompt_ids};
use dsocr_tests::{CaseIndex, TINY_CHECKPOINTS, checkpoint_dir, fixtures_dir, read_fixture};
use serde::Deserialize;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_json(&read_fixture(&checkpoint_dir("tiny-a").join("tokenizer.json"))).unwrap()
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct TokenizerCases {
    cases: Vec<TokenizerCase>,
}

#[test]
fn encodes_and_decodes_like_python_tokenizers() {
    let tok = tokenizer();
    let cases: TokenizerCases = serde_json::from_slice(&read_fixture(&fixtures_dir().join("tokenizer_cases.json"))).unwrap();
    assert!(cases.cases.len() >= 10);
    for case in cases.cases {
        let ids = tok.encode(&case.text).unwrap();
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        assert_eq!(tok.decode(&ids).unwrap(), case.decoded, "decode of {:?}", case.text);
    }
}

#[test]
fn special_tokens_have_the_spec_ids() {
    let tok = tokenizer();
    let expected = [
        ("<｜begin▁of▁sentence｜>", BOS_ID),
        ("<｜end▁of▁sentence｜>", EOS_ID),
        ("<｜▁pad▁｜>", 2),
        ("<｜User｜>", 128803),
        ("<｜Assistant｜>", 128804),
        ("<|EOT|>", 128805),
        ("<image>", IMAGE_TOKEN_ID),
        ("<|ref|>", 128816),
        ("<|/ref|>", 128817),
        ("<|det|>", 128818),
        ("<|/det|>", 128819),
        ("<|grounding|>", 128820),
        ("<td>", 128821),
        ("</td>", 128822),
        ("<tr>", 128823),
        ("</tr>", 128824),
        ("<|User|>", 128825),
        ("<|Assistant|>", 128826),
    ];
    for (token, id) in expected {
        assert_eq!(tok.token_id(token), Some(id), "{token}");
        assert_eq!(tok.encode(token).unwrap(), vec![id], "{token} encodes as one id");
    }
    assert_eq!(tok.vocab_size(), 128_827);
}

fn task_for(prompt: &str) -> Task {
    [Task::Markdown, Task::FreeOcr, Task::Ocr, Task::ParseFigure, Task::Describe]
        .into_iter()
        .find(|t| t.prompt() == prompt.trim())
        .unwrap_or_else(|| Task::Raw(prompt.to_string()))
}

#[test]
fn prompt_ids_equal_the_official_infer_ids() {
    let tok = tokenizer();
    for checkpoint in TINY_CHECKPOINTS {
        for case in CaseIndex::load(checkpoint).cases {
            let task = task_for(&case.prompt);
            assert!(!matches!(task, Task::Raw(_)), "fixture prompt {:?} is an official task", case.prompt);
            let (base, tile) = if case.mode == "gundam" { (1024, 640) } else { (mode_size(&case.mode), 0) };
            let count = image_token_count(base, tile, case.grid);
            let ids = prompt_ids(&tok, &task.prompt(), &[count]).unwrap();
            let reference: Vec<u32> = case.fixture(checkpoint).i64("input_ids").into_iter().map(|t| t as u32).collect();
            assert_eq!(ids, reference, "{checkpoint} {} {}", case.image, case.mode);
        }
    }
}

fn mode_size(mode: &str) -> usize {
    match mode {
        "tiny" => 512,
        "small" => 640,
        "base" => 1024,
        "large" => 1280,
        other => panic!("{other}"),
    }
}

#[test]
fn prompts_are_the_official_strings() {
    assert_eq!(Task::Locate("the red circle".into()).prompt(), "<image>\nLocate <|ref|>the red circle<|/ref|> in the image.");
    let tok = tokenizer();
    // The model card's markdown prompt has a trailing space; the plain template strips it.
    let a = prompt_ids(&tok, "<image>\n<|grounding|>Convert the document to markdown. ", &[73]).unwrap();
    assert_eq!(a, prompt_ids(&tok, &Task::Markdown.prompt(), &[73]).unwrap());
    assert_eq!(a[0], BOS_ID);
    assert_eq!(a.iter().filter(|&&t| t == IMAGE_TOKEN_ID).count(), 73);
    assert!(a.contains(&128820));
    assert!(prompt_ids(&tok, "no image here", &[73]).is_err());
    assert_eq!(prompt_ids(&tok, "text only", &[]).unwrap()[0], BOS_ID);
}
