#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Query};
use axum::http::Request;
use serde_json::{json, Value};

/// Status, headers and parsed body of the error's response.
async fn respond(e: OpenAiError) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = e.into_response();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, headers, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn every_constructor_gives_its_status_type_and_the_openai_shape() {
    let cases = [
        (
            OpenAiError::bad_request("bad", Some("messages")),
            400,
            "BadRequestError",
            json!("messages"),
        ),
        (
            OpenAiError::bad_request("bad", None),
            400,
            "BadRequestError",
            Value::Null,
        ),
        (
            OpenAiError::not_found("The model `x` does not exist.", Some("model")),
            404,
            "NotFoundError",
            json!("model"),
        ),
        (
            OpenAiError::unauthorized("no key"),
            401,
            "AuthenticationError",
            Value::Null,
        ),
        (
            OpenAiError::payload_too_large("big"),
            413,
            "PayloadTooLargeError",
            Value::Null,
        ),
        (
            OpenAiError::internal("oops"),
            500,
            "InternalServerError",
            Value::Null,
        ),
        (
            OpenAiError::bad_gateway("upstream"),
            502,
            "BadGatewayError",
            Value::Null,
        ),
        (
            OpenAiError::service_unavailable("busy", None),
            503,
            "ServiceUnavailableError",
            Value::Null,
        ),
        (
            OpenAiError::new(StatusCode::TOO_MANY_REQUESTS, "slow down"),
            429,
            "RateLimitError",
            Value::Null,
        ),
    ];
    for (err, status, kind, param) in cases {
        assert_eq!(err.status().as_u16(), status);
        assert_eq!(err.error_type(), kind);
        let message = err.message().to_string();
        let (got_status, headers, body) = respond(err).await;
        assert_eq!(got_status.as_u16(), status);
        assert_eq!(
            headers.get(header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
        assert!(headers.get(header::RETRY_AFTER).is_none());
        assert_eq!(
            body,
            json!({"error": {"message": message, "type": kind, "param": param, "code": status}})
        );
    }
}

#[tokio::test]
async fn service_unavailable_can_carry_retry_after() {
    let err = OpenAiError::service_unavailable("no endpoint", Some(2));
    assert_eq!(err.retry_after(), Some(2));
    let (status, headers, body) = respond(err).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "2");
    assert_eq!(body["error"]["type"], "ServiceUnavailableError");
    assert_eq!(body["error"]["code"], 503);
}

#[test]
fn the_type_follows_from_the_status_alone() {
    for (status, kind) in [
        (403, "PermissionDeniedError"),
        (409, "ConflictError"),
        (415, "UnsupportedMediaTypeError"),
        (422, "UnprocessableEntityError"),
        (501, "NotImplementedError"),
        (504, "GatewayTimeoutError"),
        (507, "InternalServerError"),
        (405, "BadRequestError"),
    ] {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(error_type(status), kind, "{status}");
        assert_eq!(OpenAiError::new(status, "m").error_type(), kind);
    }
    // Serialized directly (e.g. into an SSE event) it is the whole body.
    let e = OpenAiError::bad_request("m", Some("tools"));
    assert_eq!(
        serde_json::to_string(&e).unwrap(),
        r#"{"error":{"message":"m","type":"BadRequestError","param":"tools","code":400}}"#
    );
    assert_eq!(e.to_string(), "m");
    assert_eq!(e.param(), Some("tools"));
}

fn json_request(content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut req = Request::post("/");
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    req.body(body.into()).unwrap()
}

async fn json_rejection(req: Request<Body>) -> OpenAiError {
    match axum::Json::<Vec<u32>>::from_request(req, &()).await {
        Ok(_) => panic!("accepted"),
        Err(e) => e.into(),
    }
}

#[tokio::test]
async fn rejections_keep_their_status_but_422_becomes_400() {
    let syntax = json_rejection(json_request(Some("application/json"), "{nope")).await;
    assert_eq!(syntax.status(), StatusCode::BAD_REQUEST);
    assert!(!syntax.message().is_empty());
    // Valid JSON of the wrong shape is axum's 422; vLLM answers it as 400.
    let data = json_rejection(json_request(Some("application/json"), r#"{"a":1}"#)).await;
    assert_eq!(data.status(), StatusCode::BAD_REQUEST);
    assert_eq!(data.error_type(), "BadRequestError");
    let media = json_rejection(json_request(None, "[1]")).await;
    assert_eq!(media.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Over axum's default 2 MiB body limit.
    let huge = vec![b' '; 3 << 20];
    let too_big = json_rejection(json_request(Some("application/json"), huge.clone())).await;
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let bytes: OpenAiError = match Bytes::from_request(json_request(None, huge), &()).await {
        Ok(_) => panic!("accepted"),
        Err(e) => e.into(),
    };
    assert_eq!(bytes.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (_, _, body) = respond(bytes).await;
    assert_eq!(body["error"]["type"], "PayloadTooLargeError");
    assert_eq!(body["error"]["code"], 413);

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Q {
        n: u32,
    }
    let (mut parts, _) = Request::get("/?n=x").body(()).unwrap().into_parts();
    let query: OpenAiError = match Query::<Q>::from_request_parts(&mut parts, &()).await {
        Ok(_) => panic!("accepted"),
        Err(e) => e.into(),
    };
    assert_eq!(query.status(), StatusCode::BAD_REQUEST);
    assert_eq!(query.error_type(), "BadRequestError");
}
