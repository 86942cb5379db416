//! The inference modes (Tiny … Gundam) and the view geometry each gives a model version.

use super::ModelVersion;
use crate::error::{Error, Result};

/// How an image is turned into views (spec §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// 512×512 squash-resize, 64 vision tokens.
    Tiny,
    /// 640×640 squash-resize, 100 vision tokens.
    Small,
    /// 1024×1024 fit + pad, 256 vision tokens.
    Base,
    /// 1280×1280 fit + pad, 400 vision tokens.
    Large,
    /// 1024 global view (fit + pad) plus 640×640 tiles for larger images.
    Gundam,
}

impl Mode {
    pub const ALL: [Mode; 5] = [Mode::Tiny, Mode::Small, Mode::Base, Mode::Large, Mode::Gundam];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Tiny => "tiny",
            Mode::Small => "small",
            Mode::Base => "base",
            Mode::Large => "large",
            Mode::Gundam => "gundam",
        }
    }

    /// `base_size` of the reference `infer` call: the global view's side in crop mode.
    pub fn base_size(self) -> usize {
        match self {
            Mode::Tiny => 512,
            Mode::Small => 640,
            Mode::Base | Mode::Gundam => 1024,
            Mode::Large => 1280,
        }
    }

    /// `image_size` of the reference `infer` call: the view side (native modes) or tile side (Gundam).
    pub fn image_size(self) -> usize {
        match self {
            Mode::Tiny => 512,
            Mode::Small => 640,
            Mode::Base => 1024,
            Mode::Large => 1280,
            Mode::Gundam => 640,
        }
    }

    /// Whether the image is also cut into tiles (the reference's `crop_mode`).
    pub fn crop_mode(self) -> bool {
        matches!(self, Mode::Gundam)
    }
}

/// How a mode turns an image into views for one model version: the global view's side and how it
/// is made, and the tiles (the reference `infer`'s `base_size`, `image_size` and `crop_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Side of the global view.
    pub global: usize,
    /// The global view is squash-resized to `global` (v1 Tiny/Small), else fit and centre-padded.
    pub squash: bool,
    /// Tile side when the mode cuts tiles (images with a side over it are tiled), `None` otherwise.
    pub tile: Option<usize>,
    /// The reference's largest tile count (`dynamic_preprocess`'s `max_num`): 9 for v1, 6 for v2.
    pub default_max_tiles: usize,
}

impl Mode {
    /// The modes a model version has: all five for DeepSeek-OCR; Base and Gundam for DeepSeek-OCR-2
    /// (its query encoder has learned queries for 1024 views and 768 tiles only).
    pub fn available(version: ModelVersion) -> &'static [Mode] {
        match version {
            ModelVersion::Ocr1 => &Mode::ALL,
            ModelVersion::Ocr2 => &[Mode::Base, Mode::Gundam],
        }
    }

    /// The view geometry of this mode for `version`; a mode the version does not have is an error.
    pub fn geometry(self, version: ModelVersion) -> Result<Geometry> {
        match version {
            ModelVersion::Ocr1 => Ok(Geometry {
                global: if self.crop_mode() { self.base_size() } else { self.image_size() },
                squash: !self.crop_mode() && self.image_size() <= 640,
                tile: self.crop_mode().then_some(self.image_size()),
                default_max_tiles: 9,
            }),
            ModelVersion::Ocr2 => match self {
                // `infer(base_size=1024, image_size=1024, crop_mode=False)`: fit + pad to 1024.
                Mode::Base => Ok(Geometry { global: 1024, squash: false, tile: None, default_max_tiles: 6 }),
                // The model card's call: `base_size=1024, image_size=768, crop_mode=True`.
                Mode::Gundam => Ok(Geometry { global: 1024, squash: false, tile: Some(768), default_max_tiles: 6 }),
                other => Err(Error::InvalidArgument(format!(
                    "mode {} does not exist for {}: use base or gundam",
                    other.name(),
                    version.display_name()
                ))),
            },
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::InvalidArgument(format!("unknown mode {s:?} (tiny, small, base, large, gundam)")))
    }
}
