//! The ext_proc messages the endpoint picker reads and writes, built from
//! and into plain values, so `exchange.rs` reads as the protocol's steps.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderMap as EnvoyHeaders, HeaderValue,
    HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_response::Response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingResponse,
    StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use http::{HeaderMap, HeaderName, HeaderValue as HttpValue};

/// The header Envoy's ORIGINAL_DST cluster routes by: `ip:port[,ip:port...]`.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// The dynamic-metadata namespace the destination is also written under.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Where Envoy puts the endpoint that actually served (response path).
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// The subset hint's namespace and key: the pick must come from this list.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Largest body chunk sent back (the reference implementation's size).
pub const BODY_CHUNK_BYTES: usize = 62_000;

/// Envoy's headers as an `http::HeaderMap`, pseudo-headers (`:path`,
/// `:method`, `:status`) returned apart. Values come in `raw_value` from
/// current Envoys, in `value` from older ones.
pub struct Headers {
    pub map: HeaderMap,
    pub pseudo: HashMap<String, String>,
}

impl Headers {
    pub fn from_envoy(headers: Option<&EnvoyHeaders>) -> Self {
        let mut map = HeaderMap::new();
        let mut pseudo = HashMap::new();
        for h in headers.map(|h| h.headers.as_slice()).unwrap_or_default() {
            let raw = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                &h.raw_value
            };
            if let Some(name) = h.key.strip_prefix(':') {
                pseudo.insert(name.to_string(), String::from_utf8_lossy(raw).into_owned());
                continue;
            }
            // A header that is not valid HTTP is dropped, as a proxy would.
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(h.key.as_bytes()),
                HttpValue::from_bytes(raw),
            ) {
                map.append(n, v);
            }
        }
        Self { map, pseudo }
    }

    pub fn pseudo(&self, name: &str) -> &str {
        self.pseudo.get(name).map_or("", String::as_str)
    }
}

/// A header to set, replacing any value it had.
pub fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// A string value in a metadata `Struct`.
fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// The request-headers answer that names the destination: headers set and
/// removed, the route cache cleared (the destination changed it). The header
/// names the primary alone (Envoy's ORIGINAL_DST cluster takes one address);
/// `envoy.lb` in the dynamic metadata has `primary[,fallback...]`, for load
/// balancers that take fallbacks (Envoy's override_host policy).
pub fn destination(
    primary: &str,
    with_fallbacks: &str,
    set: Vec<HeaderValueOption>,
    remove: Vec<String>,
) -> ProcessingResponse {
    let mut set_headers = vec![set_header(DESTINATION_HEADER, primary)];
    set_headers.extend(set);
    let lb = Struct {
        fields: [(DESTINATION_HEADER.to_string(), string_value(with_fallbacks))].into(),
    };
    ProcessingResponse {
        dynamic_metadata: Some(Struct {
            fields: [(
                LB_NAMESPACE.to_string(),
                Value {
                    kind: Some(Kind::StructValue(lb)),
                },
            )]
            .into(),
        }),
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                clear_route_cache: true,
                header_mutation: Some(HeaderMutation {
                    set_headers,
                    remove_headers: remove,
                }),
                ..Default::default()
            }),
        })),
        ..Default::default()
    }
}

/// `body` as streamed body responses of at most [`BODY_CHUNK_BYTES`] each,
/// `end_of_stream` on the last (always at least one, for an empty body too).
pub fn body_chunks(body: &[u8], request: bool) -> Vec<ProcessingResponse> {
    let mut chunks: Vec<&[u8]> = body.chunks(BODY_CHUNK_BYTES).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| streamed_body(c.to_vec(), i == last, request))
        .collect()
}

/// One streamed body chunk, on the request or the response path.
pub fn streamed_body(body: Vec<u8>, end_of_stream: bool, request: bool) -> ProcessingResponse {
    let common = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }),
    };
    let response = if request {
        Response::RequestBody(common)
    } else {
        Response::ResponseBody(common)
    };
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

/// The response-headers answer (headers added for the client, if any).
pub fn response_headers(set: Vec<HeaderValueOption>) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: (!set.is_empty()).then(|| HeaderMutation {
                    set_headers: set,
                    remove_headers: Vec::new(),
                }),
                ..Default::default()
            }),
        })),
        ..Default::default()
    }
}

/// A trailers answer (nothing changed), on the request or the response path.
pub fn trailers(request: bool) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(if request {
            Response::RequestTrailers(t)
        } else {
            Response::ResponseTrailers(t)
        }),
        ..Default::default()
    }
}

/// The request answered by the picker itself (400, 404, 413, 429, 503):
/// `status`, JSON `body` and headers such as `Retry-After`.
pub fn immediate(status: u16, body: Vec<u8>, headers: &[(&str, String)]) -> ProcessingResponse {
    let mut set_headers = vec![set_header("content-type", "application/json")];
    set_headers.extend(headers.iter().map(|(k, v)| set_header(k, v)));
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(HeaderMutation {
                set_headers,
                remove_headers: Vec::new(),
            }),
            body,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The `ip:port` list under `namespace`/`key` of the metadata Envoy sent:
/// a string (comma-separated) or a list of strings. None if absent.
pub fn metadata_endpoints(
    md: Option<&Metadata>,
    namespace: &str,
    key: &str,
) -> Option<Vec<String>> {
    let value = md?.filter_metadata.get(namespace)?.fields.get(key)?;
    let strings = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    match &value.kind {
        Some(Kind::StringValue(s)) => Some(strings(s)),
        Some(Kind::ListValue(ListValue { values })) => Some(
            values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(strings(s)),
                    _ => None,
                })
                .flatten()
                .collect(),
        ),
        _ => Some(Vec::new()),
    }
}
