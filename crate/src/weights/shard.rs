//! One safetensors file, either held in memory (a memory map natively, fetched bytes for small
//! files) or read piece by piece through a [`RangeFetch`] (HTTP Range requests in the browser), so
//! that the real 6.7 GB file never has to sit whole in wasm32's 4 GiB address space. No file I/O
//! here. A [`super::Checkpoint`] is one or more of these.

use std::cell::RefCell;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::error::{Error, Result};

/// A boxed future that need not be `Send` (browser futures are not).
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Reads byte ranges of a checkpoint file (e.g. with HTTP Range requests).
pub trait RangeFetch {
    /// Bytes `start..end` of the file (exactly `end - start` of them).
    fn fetch(&self, start: u64, end: u64) -> LocalBoxFuture<'_, Result<Vec<u8>>>;
}

/// How much a ranged checkpoint reads ahead per request: tensors are small and mostly stored in the
/// order they are loaded, so one request usually serves many of them.
pub const DEFAULT_WINDOW_BYTES: usize = 32 << 20;

/// Largest header we accept (the real checkpoint's is ≈ 0.3 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// A parsed safetensors file.
pub struct Shard<'a> {
    metadata: Metadata,
    data: Data<'a>,
}

enum Data<'a> {
    Memory {
        /// The data section (everything after the header) and its offset in the file.
        data: &'a [u8],
        data_start: usize,
        /// Told `(file offset, length)` of each span once read (see [`Checkpoint::with_release`]).
        release: Option<Box<dyn Fn(usize, usize) + 'a>>,
    },
    Ranged(Ranged),
}

struct Ranged {
    fetch: Box<dyn RangeFetch>,
    /// File offset of the data section.
    data_start: u64,
    window_bytes: usize,
    /// The span of the data section fetched last, `(offset, bytes)`; replaced, not grown.
    window: RefCell<Option<(usize, Vec<u8>)>>,
}

impl<'a> Shard<'a> {
    /// Parses a whole file held in memory; tensor data is read lazily by name.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let header_len = header_len(bytes.get(..8).ok_or_else(|| bad("file is shorter than its 8-byte header length"))?)?;
        let data_start = usize::try_from(8 + header_len).map_err(|_| bad("header length overflows"))?;
        let header = bytes.get(8..data_start).ok_or_else(|| bad("file ends inside the header"))?;
        let metadata = parse_metadata(header)?;
        let data = &bytes[data_start..];
        if metadata.data_len() != data.len() {
            return Err(bad(&format!("the header describes {} bytes of tensor data, the file holds {}", metadata.data_len(), data.len())));
        }
        Ok(Self { metadata, data: Data::Memory { data, data_start, release: None } })
    }

    /// For a memory-mapped file: `release(file offset, length)` is called after each read so the
    /// caller can drop those pages (natively `madvise(MADV_DONTNEED)`), so that loading does not hold
    /// the mapped file and the converted weights in memory at once.
    pub fn with_release(mut self, release: Box<dyn Fn(usize, usize) + 'a>) -> Self {
        if let Data::Memory { release: slot, .. } = &mut self.data {
            *slot = Some(release);
        }
        self
    }

    /// Opens a checkpoint through `fetch`: reads the header now and each tensor when it is loaded,
    /// `window_bytes` at a time (see [`DEFAULT_WINDOW_BYTES`]).
    pub async fn open(fetch: Box<dyn RangeFetch>, window_bytes: usize) -> Result<Shard<'static>> {
        let header_len = header_len(&fetch.fetch(0, 8).await?)?;
        let header = fetch.fetch(8, 8 + header_len).await?;
        let metadata = parse_metadata(&header)?;
        let ranged = Ranged { fetch, data_start: 8 + header_len, window_bytes: window_bytes.max(1), window: RefCell::new(None) };
        Ok(Shard { metadata, data: Data::Ranged(ranged) })
    }

    /// Names of all tensors in the file (unordered).
    pub fn names(&self) -> Vec<String> {
        self.metadata.tensors().into_keys().collect()
    }

    /// Bytes of tensor data in the file.
    pub fn data_len(&self) -> usize {
        self.metadata.data_len()
    }

    /// Dtype, shape and offsets of `name`.
    pub(crate) fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.metadata.info(name).ok_or_else(|| Error::MissingTensor { name: name.into() })
    }

    /// The stored bytes of rows `rows` (along the first axis) of `name`, handed to `f`.
    pub(crate) async fn rows<T>(&self, name: &str, rows: Range<usize>, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        let info = self.info(name)?;
        let total_rows = info.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > total_rows {
            return Err(Error::InvalidArgument(format!("rows {rows:?} of `{name}` with {total_rows} rows")));
        }
        let row_bits = info.dtype.bitsize() * info.shape.iter().skip(1).product::<usize>();
        if row_bits % 8 != 0 {
            return Err(bad(&format!("tensor `{name}`: rows are not whole bytes")));
        }
        let row_bytes = row_bits / 8;
        let start = info.data_offsets.0 + rows.start * row_bytes;
        self.read(start..start + rows.len() * row_bytes, f).await
    }

    /// Hands `f` the bytes `span` of the data section.
    async fn read<T>(&self, span: Range<usize>, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        match &self.data {
            Data::Memory { data, data_start, release } => {
                let value = f(&data[span.clone()]);
                if let Some(release) = release {
                    release(data_start + span.start, span.len());
                }
                Ok(value)
            }
            Data::Ranged(ranged) => {
                ranged.ensure(span.clone(), self.metadata.data_len()).await?;
                let window = ranged.window.borrow();
                let (offset, bytes) = window.as_ref().expect("ensure() filled the window");
                Ok(f(&bytes[span.start - offset..span.end - offset]))
            }
        }
    }
}

impl Ranged {
    /// Makes the window cover `span`, fetching `span` plus read-ahead (up to `data_len`) on a miss.
    async fn ensure(&self, span: Range<usize>, data_len: usize) -> Result<()> {
        let hit = matches!(&*self.window.borrow(), Some((offset, bytes)) if *offset <= span.start && span.end <= offset + bytes.len());
        if hit {
            return Ok(());
        }
        // Drop the old window before fetching the next: one window in memory at a time.
        self.window.borrow_mut().take();
        let end = span.end.max(span.start.saturating_add(self.window_bytes).min(data_len));
        let (from, to) = (self.data_start + span.start as u64, self.data_start + end as u64);
        let bytes = self.fetch.fetch(from, to).await?;
        if bytes.len() != end - span.start {
            return Err(Error::Download(format!("asked for bytes {from}..{to}, got {}", bytes.len())));
        }
        *self.window.borrow_mut() = Some((span.start, bytes));
        Ok(())
    }
}

fn bad(message: &str) -> Error {
    Error::Safetensors(message.into())
}

/// The little-endian u64 header length at the start of a safetensors file.
fn header_len(prefix: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = prefix.try_into().map_err(|_| bad("file is shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(bytes);
    if n > MAX_HEADER_BYTES {
        return Err(bad(&format!("header of {n} bytes is implausibly large")));
    }
    Ok(n)
}

/// Parses and validates the JSON header (offsets contiguous and matching each tensor's size).
fn parse_metadata(header: &[u8]) -> Result<Metadata> {
    let text = std::str::from_utf8(header).map_err(|e| bad(&format!("header is not UTF-8: {e}")))?;
    let metadata = serde_json::from_str::<Metadata>(text).map_err(|e| bad(&format!("header: {e}")))?;
    // Every later read trusts the offsets: they must tile the data section exactly.
    let mut next = 0;
    for name in metadata.offset_keys() {
        let info = metadata.info(&name).expect("a listed name");
        let (start, end) = info.data_offsets;
        let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |n, &d| n.checked_mul(d));
        if start != next || bits.is_none_or(|b| b % 8 != 0 || end.checked_sub(start) != Some(b / 8)) {
            return Err(bad(&format!("tensor `{name}`: offsets {start}..{end} do not match its shape and dtype")));
        }
        next = end;
    }
    Ok(metadata)
}
