//! The OpenAPI 3 document of every route (`GET /openapi.json`): the handlers' `#[utoipa::path]`
//! annotations (beside each handler in `routes.rs` and `console.rs`) and their schemas gathered in one
//! place, with the token's security scheme.

use axum::Json;

use super::console::{self, LogSize, Point, ProcessorState, ProcessorView, Range, Summary, TailEvent, TopUser};
use super::error::ErrorBody;
use super::routes::{
    self, BatchReceived, BatchRefused, EventBody, Health, LineError, Readiness, Received, UserRevenue,
};

/// The OpenAPI 3 document of every route, generated from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "eps", description = "Event processing system: durable ingest, exactly-once revenue."),
    paths(routes::live_event, routes::post_events, routes::user_events, routes::healthz, routes::readyz, routes::metrics,
        openapi_json, console::summary, console::stream),
    components(schemas(Received, BatchReceived, BatchRefused, LineError, UserRevenue, ErrorBody, EventBody, Health, Readiness,
        Summary, Point, TailEvent, TopUser, LogSize, Range, ProcessorView, ProcessorState)),
    modifiers(&TokenScheme),
)]
pub(crate) struct ApiDoc;

struct TokenScheme;

impl utoipa::Modify for TokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "The token, bare (`secret`, as the seed's client sends it) or as `Bearer <token>`",
            ))),
        );
    }
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses(
    (status = 200, description = "The OpenAPI 3 document of this server", content_type = "application/json"),
))]
pub(super) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}
