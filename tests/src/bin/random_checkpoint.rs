//! Writes a full-size random-weight checkpoint in the original layout (config.json of the hub,
//! `model-00001-of-000001.safetensors` in bf16, the tokenizer files) without PyTorch: the same
//! per-tensor distributions as `tests/reference/generate.py --full` (`init_std`), another random
//! stream. For the full-size benchmarks and accuracy figures (~6.7 GB).
//!
//! ```sh
//! cargo run --release -p dsocr-tests --bin random_checkpoint -- /work/full-ckpt [seed]
//! ```

use std::io::Write;
use std::path::PathBuf;

use dsocr::Config;
use dsocr::weights::expected_tensors;
use dsocr_tests::fixtures_dir;

/// `(mean, std)` of a tensor, as `init_std` in generate.py.
fn init_std(name: &str, shape: &[usize]) -> (f32, f32) {
    if shape.len() == 1 {
        if name.ends_with("bias") {
            return (0.0, 0.1);
        }
        if name.contains("norm") || name.contains("layrnorm") {
            return (1.0, 0.1);
        }
        return (0.0, 1.0);
    }
    if name.ends_with("pos_embed") || name.contains("rel_pos") || name.contains("position_embedding") {
        return (0.0, 0.5);
    }
    if name.ends_with("embed_tokens.weight") {
        return (0.0, 1.0);
    }
    (0.0, 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt())
}

/// splitmix64 → uniform → Box–Muller normals, as bf16 bytes.
fn fill(out: &mut [u8], seed: u64, mean: f32, std: f32) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    };
    for pair in out.chunks_mut(4) {
        let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let (a, b) = ((r * (std::f64::consts::TAU * u2).cos()) as f32, (r * (std::f64::consts::TAU * u2).sin()) as f32);
        let values = [half::bf16::from_f32(a * std + mean).to_le_bytes(), half::bf16::from_f32(b * std + mean).to_le_bytes()];
        for (o, v) in pair.iter_mut().zip(values.iter().flatten()) {
            *o = *v;
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().expect("usage: random_checkpoint <out dir> [seed]"));
    let seed: u64 = args.next().map_or(42, |s| s.parse().expect("seed"));
    let hub = fixtures_dir().join("hub");
    let config_json = std::fs::read_to_string(hub.join("config.json")).unwrap();
    let config = Config::from_json(&config_json).unwrap();
    let tensors = expected_tensors(&config);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("config.json"), &config_json).unwrap();
    std::fs::copy(fixtures_dir().join("../../weights/tokenizer/tokenizer.json"), out.join("tokenizer.json")).unwrap();
    // The hub's other small files, so that transformers' AutoTokenizer loads the folder too.
    for file in ["tokenizer_config.json", "special_tokens_map.json", "processor_config.json"] {
        std::fs::copy(hub.join(file), out.join(file)).unwrap();
    }

    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in &tensors {
        let bytes = 2 * t.shape.iter().product::<usize>();
        header.insert(t.name.clone(), serde_json::json!({ "dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + bytes] }));
        offset += bytes;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let path = out.join("model-00001-of-000001.safetensors");
    let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&path).unwrap());
    file.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (i, t) in tensors.iter().enumerate() {
        let (mean, std) = init_std(&t.name, &t.shape);
        let mut bytes = vec![0u8; 2 * t.shape.iter().product::<usize>()];
        // Chunks of 1 Mi values, each its own stream: the same bytes whatever the thread count.
        let chunks: Vec<(usize, &mut [u8])> = bytes.chunks_mut(2 << 20).enumerate().collect();
        let per = chunks.len().div_ceil(threads);
        let mut chunks = chunks;
        std::thread::scope(|s| {
            while !chunks.is_empty() {
                let batch: Vec<(usize, &mut [u8])> = chunks.drain(..per.min(chunks.len())).collect();
                s.spawn(move || {
                    for (c, chunk) in batch {
                        fill(chunk, seed ^ ((i as u64) << 32) ^ c as u64, mean, std);
                    }
                });
            }
        });
        file.write_all(&bytes).unwrap();
    }
    file.flush().unwrap();
    println!("wrote {}: {} tensors, {} bytes of data", out.display(), tensors.len(), offset);
}
