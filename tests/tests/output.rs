//! Output post-processing on text shaped like real DeepSeek-OCR output (spec §10).

use dsocr::output::{clean_markdown, parse_grounding, strip_eos};

const PAGE: &str = "<|ref|>title<|/ref|><|det|>[[90, 47, 512, 80]]<|/det|>\n# Quarterly Report 2026\n\n\
<|ref|>text<|/ref|><|det|>[[90, 107, 905, 260]]<|/det|>\nRevenue grew by 12% while costs fell.\n\n\
<|ref|>table<|/ref|><|det|>[[75, 683, 920, 800]]<|/det|>\n<table><tr><td>Item</td><td>Qty</td></tr><tr><td>Milk</td><td>2</td></tr></table>\n\n\
<|ref|>equation<|/ref|><|det|>[[100, 820, 600, 850]]<|/det|>\n\\[ f(x) \\coloneqq x^2 \\]\n\n\
<|ref|>image<|/ref|><|det|>[[588, 861, 925, 962]]<|/det|>\n\n\
<|ref|>image_caption<|/ref|><|det|>[[600, 965, 900, 990]]<|/det|>\n<center>Figure 1: a circle</center><｜end▁of▁sentence｜>";

#[test]
fn output_blocks_of_a_document_page() {
    let text = strip_eos(PAGE);
    assert!(!text.contains("end▁of▁sentence"));
    let blocks = parse_grounding(text, [1190, 1684]);
    let labels: Vec<&str> = blocks.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(labels, ["title", "text", "table", "equation", "image", "image_caption"]);
    // trunc(v / 999 · size) on the original image.
    assert_eq!(blocks[0].boxes, vec![[107, 79, 609, 134]]);
    assert_eq!(blocks[0].boxes_normalized, vec![[90.0, 47.0, 512.0, 80.0]]);
    assert_eq!(blocks[0].text, "# Quarterly Report 2026");
    assert!(blocks[2].text.starts_with("<table><tr><td>Item</td>"));
    assert_eq!(blocks[3].text, "\\[ f(x) \\coloneqq x^2 \\]");
    assert_eq!(blocks[4].text, "");
    assert_eq!(blocks[5].text, "<center>Figure 1: a circle</center>");
}

#[test]
fn output_markdown_is_cleaned_like_the_reference() {
    let md = clean_markdown(strip_eos(PAGE));
    assert!(!md.contains("<|ref|>") && !md.contains("<|det|>"));
    assert!(md.starts_with("\n# Quarterly Report 2026"));
    assert!(md.contains("![](images/0.jpg)\n"));
    assert!(md.contains("f(x) := x^2"), "{md}");
    assert!(md.contains("<table>"));
    // The quirk: without a non-image span the replacements do not happen.
    let only_image = "<|ref|>image<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n\\coloneqq";
    assert_eq!(clean_markdown(only_image), "![](images/0.jpg)\n\n\\coloneqq");
}

#[test]
fn output_several_boxes_per_label() {
    let text = "<|ref|>the red circle<|/ref|><|det|>[[10, 20, 110, 120], [500, 500, 999, 999]]<|/det|>";
    let blocks = parse_grounding(text, [1000, 500]);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].label, "the red circle");
    assert_eq!(blocks[0].boxes, vec![[10, 10, 110, 60], [500, 250, 1000, 500]]);
}

#[test]
fn output_truncated_and_malformed_streams_keep_the_text() {
    // Cut inside the det list (max_new_tokens hit): no block for it, the text before stays.
    let cut = "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nfirst paragraph\n\n<|ref|>text<|/ref|><|det|>[[5, 6,";
    let blocks = parse_grounding(cut, [100, 100]);
    assert_eq!(blocks.len(), 1);
    assert!(blocks[0].text.starts_with("first paragraph"));
    assert!(clean_markdown(cut).contains("first paragraph"));
    // Garbage coordinates: the block exists without boxes.
    let bad = "<|ref|>text<|/ref|><|det|>[[a, b, c, d]]<|/det|>\nhello";
    let blocks = parse_grounding(bad, [100, 100]);
    assert_eq!((blocks[0].boxes.len(), blocks[0].text.as_str()), (0, "hello"));
    // Unclosed tags, lone closers, empty input: no panic.
    for s in ["<|ref|>", "<|ref|>x<|/ref|>", "<|/det|><|det|>", "", "plain text", "<|ref|><|/ref|><|det|><|/det|>"] {
        let _ = parse_grounding(s, [10, 10]);
        let _ = clean_markdown(s);
    }
    assert_eq!(strip_eos("  text  "), "text");
}

#[test]
fn output_plain_ocr_has_no_blocks() {
    let text = "Milk 2.49\nBread 3.10\nTOTAL 5.59";
    assert!(parse_grounding(text, [300, 200]).is_empty());
    assert_eq!(clean_markdown(text), text);
}
