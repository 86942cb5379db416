//! Grounding tags `<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], …]<|/det|>` followed by the element's
//! content (spec §10). Coordinates are on a 0..999 grid over the ORIGINAL image. Parsing never fails:
//! malformed or truncated tags simply yield no block, and the text is kept.

use serde::Serialize;

const REF_OPEN: &str = "<|ref|>";
const REF_CLOSE: &str = "<|/ref|>";
const DET_OPEN: &str = "<|det|>";
const DET_CLOSE: &str = "<|/det|>";
/// The EOS token's text (full-width bars).
pub const EOS_TEXT: &str = "<｜end▁of▁sentence｜>";

/// One complete `<|ref|>…<|/det|>` span, as the reference's regex finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundingMatch {
    /// Byte range of the whole span in the text.
    pub span: std::ops::Range<usize>,
    pub label: String,
    /// The text between `<|det|>` and `<|/det|>`.
    pub det: String,
}

/// A layout element: its label, boxes and content.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Block {
    /// `title`, `text`, `table`, `image`, `equation`, … or free text (Locate / OCR prompts).
    pub label: String,
    /// Boxes in pixels of the original image: `[x1, y1, x2, y2]`, `trunc(v / 999 · size)`.
    pub boxes: Vec<[u32; 4]>,
    /// The same boxes as the model wrote them (0..999 grid).
    pub boxes_normalized: Vec<[f64; 4]>,
    /// The content after the tags up to the next element, trimmed (markdown, LaTeX or HTML).
    pub text: String,
}

/// Removes one trailing EOS text and surrounding whitespace, as the reference does before parsing.
pub fn strip_eos(text: &str) -> &str {
    text.strip_suffix(EOS_TEXT).unwrap_or(text).trim()
}

/// All complete grounding spans, leftmost first, non-overlapping (the reference regex
/// `<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>` with DOTALL).
pub fn find_matches(text: &str) -> Vec<GroundingMatch> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(start) = text[from..].find(REF_OPEN).map(|i| from + i) {
        let label_start = start + REF_OPEN.len();
        // Non-greedy: the first `<|/ref|>` that is immediately followed by `<|det|>`.
        let mut search = label_start;
        let mut found = None;
        while let Some(close) = text[search..].find(REF_CLOSE).map(|i| search + i) {
            let det_start = close + REF_CLOSE.len();
            if text[det_start..].starts_with(DET_OPEN) {
                let body = det_start + DET_OPEN.len();
                if let Some(end) = text[body..].find(DET_CLOSE).map(|i| body + i) {
                    found = Some((close, body, end));
                }
                break;
            }
            search = det_start;
        }
        match found {
            Some((close, body, end)) => {
                let stop = end + DET_CLOSE.len();
                out.push(GroundingMatch { span: start..stop, label: text[label_start..close].to_string(), det: text[body..end].to_string() });
                from = stop;
            }
            None => from = label_start,
        }
    }
    out
}

/// Boxes from a det list such as `[[10, 20, 300, 400], [1, 2, 3, 4]]`: every innermost bracket with
/// exactly four numbers. Never evaluates anything; garbage gives no boxes.
pub fn parse_boxes(det: &str) -> Vec<[f64; 4]> {
    let mut boxes = Vec::new();
    let mut rest = det;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let inner = &after[..close];
        if let Some(nested) = inner.rfind('[') {
            rest = &after[nested..];
            continue;
        }
        let numbers: Vec<f64> = inner.split(',').filter_map(|v| v.trim().parse::<f64>().ok()).collect();
        if numbers.len() == 4 && inner.split(',').count() == 4 && numbers.iter().all(|v| v.is_finite()) {
            boxes.push([numbers[0], numbers[1], numbers[2], numbers[3]]);
        }
        rest = &after[close + 1..];
    }
    boxes
}

/// A 0..999 coordinate in pixels of a side of `size` pixels (`int(v / 999 · size)`, kept inside the image).
fn to_pixels(v: f64, size: u32) -> u32 {
    (v / 999.0 * size as f64).trunc().clamp(0.0, size as f64) as u32
}

/// The layout blocks of a model output (EOS already stripped) for an original image of `[w, h]`.
pub fn parse_grounding(text: &str, [w, h]: [u32; 2]) -> Vec<Block> {
    let matches = find_matches(text);
    matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let end = matches.get(i + 1).map_or(text.len(), |next| next.span.start);
            let boxes_normalized = parse_boxes(&m.det);
            let boxes = boxes_normalized
                .iter()
                .map(|b| [to_pixels(b[0], w), to_pixels(b[1], h), to_pixels(b[2], w), to_pixels(b[3], h)])
                .collect();
            Block { label: m.label.clone(), boxes, boxes_normalized, text: text[m.span.end..end].trim().to_string() }
        })
        .collect()
}

/// The reference's `result.mmd`: each `image` span becomes `![](images/{k}.jpg)\n` (k counts image spans),
/// every other span is removed (its content stays), and — only when such a span exists — `\coloneqq`
/// becomes `:=` and `\eqqcolon` `=:`.
pub fn clean_markdown(text: &str) -> String {
    let matches = find_matches(text);
    let (images, others): (Vec<_>, Vec<_>) = matches.iter().partition(|m| m.label == "image");
    let mut out = text.to_string();
    // `str.replace` of each span's text, in order: identical spans are all replaced by the first.
    for (k, m) in images.iter().enumerate() {
        out = out.replace(&text[m.span.clone()], &format!("![](images/{k}.jpg)\n"));
    }
    for m in &others {
        out = out.replace(&text[m.span.clone()], "").replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_tolerate_spacing_and_floats_and_skip_garbage() {
        assert_eq!(parse_boxes("[[1, 2, 3, 4]]"), vec![[1.0, 2.0, 3.0, 4.0]]);
        assert_eq!(parse_boxes("[[1,2,3,4],[5, 6 ,7,8.5]]"), vec![[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.5]]);
        assert!(parse_boxes("[[1, 2, 3]]").is_empty());
        assert!(parse_boxes("[[1, 2, 3, 4, 5]]").is_empty());
        assert!(parse_boxes("__import__('os')").is_empty());
        assert_eq!(parse_boxes("[[1, 2, 3, 4], [9, 9"), vec![[1.0, 2.0, 3.0, 4.0]]);
    }

    #[test]
    fn pixel_conversion_uses_999() {
        assert_eq!(to_pixels(999.0, 1190), 1190);
        assert_eq!(to_pixels(500.0, 1000), 500); // 500/999·1000 = 500.5 → 500
        assert_eq!(to_pixels(1200.0, 100), 100);
        assert_eq!(to_pixels(-5.0, 100), 0);
    }
}
