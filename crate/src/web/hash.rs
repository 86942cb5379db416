//! SHA-256 for the npm package's cache: shards are hashed as they stream into storage (WebCrypto
//! only digests whole buffers, which a 1 GB shard must never be).

use sha2::Digest;
use wasm_bindgen::prelude::*;

#[wasm_bindgen(js_name = Sha256)]
pub struct Sha256Stream(sha2::Sha256);

#[wasm_bindgen(js_class = Sha256)]
impl Sha256Stream {
    #[wasm_bindgen(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(sha2::Sha256::new())
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything added, as lowercase hex (the hasher is consumed).
    pub fn finish(self) -> String {
        crate::weights::hex(&self.0.finalize())
    }
}
