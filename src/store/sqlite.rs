//! TODO
use std::path::Path;
pub struct SqliteStore;
impl SqliteStore { pub async fn open(_p: &Path) -> anyhow::Result<Self> { todo!() } }
