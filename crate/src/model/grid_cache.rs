//! A small per-size cache for tensors derived once per input geometry (resized position tables).

use std::collections::HashMap;
use std::sync::Mutex;

/// Values computed once per grid side and reused; cloning gives an empty cache.
#[derive(Debug)]
pub struct GridCache<T> {
    values: Mutex<HashMap<usize, T>>,
}

impl<T: Clone> GridCache<T> {
    pub fn get_or_insert(&self, key: usize, make: impl FnOnce() -> T) -> T {
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        values.entry(key).or_insert_with(make).clone()
    }
}

impl<T> Default for GridCache<T> {
    fn default() -> Self {
        Self { values: Mutex::new(HashMap::new()) }
    }
}

impl<T> Clone for GridCache<T> {
    fn clone(&self) -> Self {
        Self { values: Mutex::new(HashMap::new()) }
    }
}
