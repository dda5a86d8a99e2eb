//! Errors as RFC 9457 problem details (`application/problem+json`): every error the API answers,
//! its own and axum's (a body that is not JSON, too large, an unknown route, a wrong method), has
//! the same shape — `type`, `title`, `status`, `detail`, and a stable `code` for programs.
//! [`normalize`] turns axum's plain-text rejections into problems, so there is one error format.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{json, Map, Value};

/// The media type of problem details.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One problem: an HTTP status, a stable machine code and a sentence for people.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    /// e.g. `unauthorized`, `forbidden`, `not_found`, `claim_timeout`.
    pub code: String,
    pub detail: String,
    /// Extra members (e.g. the claim reply of a refused claim, the request id to retry with).
    pub extensions: Map<String, Value>,
}

impl Problem {
    pub fn new(status: StatusCode, code: impl Into<String>, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            code: code.into(),
            detail: detail.into(),
            extensions: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Problem {
        self.extensions.insert(key.to_owned(), value.into());
        self
    }

    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    pub fn unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// The problem's JSON body.
    pub fn body(&self) -> Value {
        let mut body = json!({
            // No documentation URL per problem: `about:blank` means the status says it all, and
            // `code` tells programs which one it is.
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        let object = body.as_object_mut().expect("an object");
        for (k, v) in &self.extensions {
            object.insert(k.clone(), v.clone());
        }
        body
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body().to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The stable code of an error status axum (not a handler) answered with.
fn code_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// Middleware (`axum::middleware::map_response`): an error response that is not yet a problem
/// (axum's extractor rejections are plain text, its 404 and 405 are empty) becomes one, its text as
/// the detail.
pub async fn normalize(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Rejection texts are short; anything longer is cut, not buffered whole.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let detail = match (status, text.is_empty()) {
        (StatusCode::NOT_FOUND, true) => {
            "no such resource (GET /openapi.json lists the API)".to_owned()
        }
        (StatusCode::METHOD_NOT_ALLOWED, true) => {
            "this method is not allowed on this resource (GET /openapi.json lists the API)"
                .to_owned()
        }
        (_, true) => status.canonical_reason().unwrap_or("error").to_owned(),
        (_, false) => text,
    };
    let mut problem = Problem::new(status, code_of(status), detail).into_response();
    // Keep what axum set besides the body's type (e.g. `Allow` on a 405).
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    problem
}
