//! TODO
pub struct PostgresStore;
impl PostgresStore { pub async fn connect(_u: &str) -> anyhow::Result<Self> { todo!() } }
