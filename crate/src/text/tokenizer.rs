//! The checkpoint's `tokenizer.json` (byte-level BPE, DeepSeek-V3 vocabulary + OCR tokens) through the
//! `tokenizers` crate (spec §8.1). Works with the hub's own file or `weights/tokenizer/tokenizer.json`.

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.inner.get_vocab_size(true)).finish()
    }
}

impl Tokenizer {
    /// Parses `tokenizer.json` bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text` without special-token decoration (no BOS): `encode(text, add_special_tokens=False)`.
    /// Added tokens such as `<|grounding|>` or `<td>` match as single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, keeping special tokens (tables are made of them; spec §10.1).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a single token, e.g. `"<image>"`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
