//! Fetching a checkpoint from the Hugging Face hub (native, feature `hub`): the files of a repository
//! into the hub cache, resumable, with progress, checked against the hub's sha256 when it sends one.
//!
//! Honours `HF_ENDPOINT` (default `https://huggingface.co`) and `HF_HOME` (default `~/.cache/huggingface`).
//! Files land in `$HF_HOME/hub/models--ORG--NAME/snapshots/main/` and are reused from any snapshot there,
//! so a folder filled by `huggingface-cli download` is found too.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What a checkpoint needs: config, the single safetensors file of the original upload, tokenizer.
pub const CHECKPOINT_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model-00001-of-000001.safetensors"];

/// Download progress: file name, bytes so far, total bytes when the server says.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, Option<u64>);

const ATTEMPTS: usize = 5;

pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()).trim_end_matches('/').to_string()
}

pub fn cache_root() -> PathBuf {
    if let Ok(home) = std::env::var("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let base = std::env::var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache")
    });
    base.join("huggingface").join("hub")
}

/// Whether `source` names a hub repository (`org/name`) rather than a local folder.
pub fn is_repo_id(source: &str) -> bool {
    let parts: Vec<&str> = source.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && !Path::new(source).exists()
}

/// The local checkpoint folder for `source`: a folder as is; a hub repo id (`org/name`) or an http(s)
/// base URL fetched into the cache first (resumable, checked, `progress` per file).
pub fn resolve(source: &str, progress: Progress) -> Result<PathBuf> {
    let path = Path::new(source);
    if path.is_dir() {
        Ok(path.to_path_buf())
    } else if source.starts_with("http://") || source.starts_with("https://") {
        fetch_from_url(source, progress)
    } else if is_repo_id(source) {
        fetch_checkpoint(source, progress)
    } else {
        Err(Error::InvalidArgument(format!("{source}: not a checkpoint directory, hub repo id (org/name) or http(s) URL")))
    }
}

/// Makes sure every checkpoint file of `repo` is in the cache; returns the snapshot folder.
pub fn fetch_checkpoint(repo: &str, progress: Progress) -> Result<PathBuf> {
    let repo_dir = cache_root().join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join("main");
    std::fs::create_dir_all(&snapshot).map_err(|e| io(&snapshot, e))?;
    for file in CHECKPOINT_FILES {
        let target = snapshot.join(file);
        if target.is_file() {
            continue;
        }
        if let Some(existing) = find_in_snapshots(&repo_dir, file) {
            // A hard link costs nothing; copy only across file systems.
            if std::fs::hard_link(&existing, &target).is_err() {
                std::fs::copy(&existing, &target).map_err(|e| io(&target, e))?;
            }
            continue;
        }
        let url = format!("{}/{repo}/resolve/main/{file}", endpoint());
        download(&url, &target, file, progress)?;
    }
    Ok(snapshot)
}

/// Makes sure the checkpoint files under a plain base URL (`{base}/config.json`, …) are cached; returns
/// the folder (`$HF_HOME/hub/urls--<sanitised base>`).
pub fn fetch_from_url(base: &str, progress: Progress) -> Result<PathBuf> {
    let base = base.trim_end_matches('/');
    let key: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
    let dir = cache_root().join(format!("urls--{key}"));
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    for file in CHECKPOINT_FILES {
        let target = dir.join(file);
        if !target.is_file() {
            download(&format!("{base}/{file}"), &target, file, progress)?;
        }
    }
    Ok(dir)
}

fn find_in_snapshots(repo_dir: &Path, file: &str) -> Option<PathBuf> {
    let mut snapshots: Vec<PathBuf> = std::fs::read_dir(repo_dir.join("snapshots")).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    snapshots.sort();
    snapshots.into_iter().map(|s| s.join(file)).find(|p| p.is_file())
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

/// Downloads `url` to `target` through `target.part`, resuming with HTTP Range after a dropped connection
/// (and across runs), then checks the sha256 the hub announces for LFS files (`X-Linked-ETag` / `ETag`).
pub fn download(url: &str, target: &Path, name: &str, progress: Progress) -> Result<()> {
    let part = target.with_extension(format!("{}.part", target.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut last_error = String::new();
    for _ in 0..ATTEMPTS {
        match attempt(url, &part, name, progress) {
            Ok(expected_sha) => {
                if let Some(expected) = expected_sha {
                    let actual = sha256_file(&part)?;
                    if actual != expected {
                        let _ = std::fs::remove_file(&part);
                        return Err(Error::Download(format!("{url}: corrupted download (sha256 {actual}, expected {expected})")));
                    }
                }
                return std::fs::rename(&part, target).map_err(|e| io(target, e));
            }
            Err(Attempt::Fatal(message)) => return Err(Error::Download(message)),
            Err(Attempt::Retry(message)) => last_error = message,
        }
    }
    Err(Error::Download(format!("{url}: gave up after {ATTEMPTS} attempts: {last_error}")))
}

enum Attempt {
    Retry(String),
    Fatal(String),
}

/// One request from where the `.part` file ends; `Ok` with the announced sha256 once the file is complete.
fn attempt(url: &str, part: &Path, name: &str, progress: Progress) -> std::result::Result<Option<String>, Attempt> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = ureq::get(url).config().http_status_as_error(false).build();
    if have > 0 {
        request = request.header("Range", &format!("bytes={have}-"));
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request.call().map_err(|e| Attempt::Retry(format!("{url}: {e}")))?;
    let status = response.status().as_u16();
    let header = |key: &str| response.headers().get(key).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let sha = header("x-linked-etag").or_else(|| header("etag")).map(|t| t.trim_matches('"').trim_start_matches("W/").trim_matches('"').to_ascii_lowercase()).filter(|t| t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()));
    let (mut loaded, append) = match status {
        206 => (have, true),
        200 => (0, false),
        416 if have > 0 => return Ok(sha), // nothing left to fetch
        404 => return Err(Attempt::Fatal(format!("{url}: not found (HTTP 404)"))),
        401 | 403 => return Err(Attempt::Fatal(format!("{url}: access denied (HTTP {status}); set HF_TOKEN for gated repositories"))),
        other => return Err(Attempt::Retry(format!("{url}: HTTP {other}"))),
    };
    let total = header("content-length").and_then(|v| v.parse::<u64>().ok()).map(|n| n + loaded);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .map_err(|e| Attempt::Fatal(format!("{}: {e}", part.display())))?;
    let mut reader = response.body_mut().as_reader();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buffer).map_err(|e| Attempt::Retry(format!("{url}: connection lost after {loaded} bytes: {e}")))?;
        if n == 0 {
            break;
        }
        file.write_all(&buffer[..n]).map_err(|e| Attempt::Fatal(format!("{}: {e}", part.display())))?;
        loaded += n as u64;
        progress(name, loaded, total);
    }
    if let Some(total) = total
        && loaded < total
    {
        return Err(Attempt::Retry(format!("{url}: connection closed at {loaded} of {total} bytes")));
    }
    Ok(sha)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(crate::weights::hex(&hasher.finalize()))
}
