//! The committed fixtures themselves: intact (hashes of the generator's manifest), self-consistent, and
//! recording what the spec says the reference does (token counts, grids).

use std::collections::BTreeMap;

use dsocr_tests::{CaseIndex, TINY_CHECKPOINTS, fixtures_dir, read_fixture};
use sha2::{Digest, Sha256};

const IMAGE_TOKEN_ID: i64 = 128815;

/// Every file a generator's `MANIFEST.sha256` under `root` lists has the recorded hash.
fn check_manifest(root: &std::path::Path, generator: &str, at_least: usize) {
    let manifest = String::from_utf8(read_fixture(&root.join("MANIFEST.sha256"))).unwrap();
    let mut count = 0;
    for line in manifest.lines() {
        let (hash, rel) = line.split_once("  ").expect("`<sha256>  <path>` lines");
        let digest = Sha256::digest(read_fixture(&root.join(rel)));
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, hash, "{rel} differs from what {generator} wrote; regenerate the fixtures");
        count += 1;
    }
    assert!(count >= at_least, "manifest lists only {count} files");
}

#[test]
fn every_generated_file_matches_the_manifest() {
    check_manifest(&fixtures_dir(), "generate.py", 70);
}

#[test]
fn every_generated_ocr2_file_matches_its_manifest() {
    check_manifest(&fixtures_dir().join("ocr2"), "generate_v2.py", 27);
}

/// `g(g+1) + 1` for the global view plus, when tiled, `(g_t·nw + 1)(g_t·nh)` (spec §5.2).
fn placeholder_count(mode: &str, [nw, nh]: [usize; 2]) -> usize {
    let (base, tile) = match mode {
        "tiny" => (512, 0),
        "small" => (640, 0),
        "base" => (1024, 0),
        "large" => (1280, 0),
        "gundam" => (1024, 640),
        other => panic!("unknown mode {other}"),
    };
    let g = base / 16 / 4;
    let mut n = g * (g + 1) + 1;
    if tile > 0 && nw * nh > 1 {
        let gt = tile / 16 / 4;
        n += (gt * nw + 1) * (gt * nh);
    }
    n
}

#[test]
fn recorded_prompts_have_the_reference_layout() {
    let mut grids = BTreeMap::new();
    for name in TINY_CHECKPOINTS {
        let index = CaseIndex::load(name);
        assert_eq!(index.cases.len(), 15, "{name}: 3 images × 5 modes");
        for case in &index.cases {
            let fixture = case.fixture(name);
            let ids = fixture.i64("input_ids");
            assert_eq!(ids.len(), case.prompt_tokens);
            assert_eq!(ids[0], 0, "one BOS first");
            assert_eq!(ids.iter().filter(|&&t| t == 0).count(), 1, "exactly one BOS");
            let image_tokens = ids.iter().filter(|&&t| t == IMAGE_TOKEN_ID).count();
            assert_eq!(image_tokens, case.image_tokens);
            assert_eq!(image_tokens, placeholder_count(&case.mode, case.grid), "{name} {} {}", case.image, case.mode);
            // Placeholders are contiguous right after BOS for a prompt starting with `<image>`.
            assert!(ids[1..=image_tokens].iter().all(|&t| t == IMAGE_TOKEN_ID));
            let hidden = if name == "tiny-a" { 48 } else { 32 };
            assert_eq!(fixture.f32("image_embeds").shape, vec![image_tokens, hidden]);
            assert_eq!(fixture.i64("greedy_tokens").len(), index.greedy_tokens);
            assert_eq!(fixture.i64("greedy_tokens").iter().map(|&t| t as u32).collect::<Vec<_>>(), case.greedy_tokens);
            grids.insert((case.image.clone(), case.mode.clone()), case.grid);
        }
    }
    // Spec §2.7 worked examples: A4 page 1190×1684 → (2,3); 800×600 → (3,2); ≤ 640 → no tiles.
    assert_eq!(grids[&("page".into(), "gundam".into())], [2, 3]);
    assert_eq!(grids[&("photo".into(), "gundam".into())], [3, 2]);
    assert_eq!(grids[&("note".into(), "gundam".into())], [1, 1]);
}
