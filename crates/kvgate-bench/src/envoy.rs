//! Envoy's configs for the benches and the Envoy tier: a plain round-robin
//! proxy (the peer), and Envoy as the Gateway API Inference Extension
//! deploys it in front of an endpoint picker (ext_proc, full-duplex
//! streamed bodies, an ORIGINAL_DST cluster routed by the picker's header).

/// `http://host:port` -> (host, port).
pub(crate) fn host_port(url: &str) -> Option<(&str, &str)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.trim_end_matches('/').rsplit_once(':')
}

fn endpoints_yaml(workers: &[String]) -> String {
    workers
        .iter()
        .filter_map(|w| host_port(w))
        .map(|(h, p)| {
            format!(
                "        - endpoint: {{address: {{socket_address: {{address: {h}, port_value: {p}}}}}}}\n"
            )
        })
        .collect()
}

/// A static Envoy: one listener, one round-robin cluster of the workers, no
/// timeouts that a long stream could hit, no circuit breaking under load.
pub fn envoy_config(port: u16, admin_port: u16, workers: &[String]) -> String {
    let endpoints = endpoints_yaml(workers);
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          stream_idle_timeout: 0s
          route_config:
            virtual_hosts:
            - name: engines
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: engines, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: engines
    type: STATIC
    lb_policy: ROUND_ROBIN
    connect_timeout: 2s
    circuit_breakers:
      thresholds:
      - {{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100}}
    load_assignment:
      cluster_name: engines
      endpoints:
      - lb_endpoints:
{endpoints}"#
    )
}

/// Envoy in front of an endpoint picker, as the Inference Extension runs it.
#[derive(Debug, Clone)]
pub struct EppEnvoy {
    /// The listener clients call.
    pub port: u16,
    pub admin_port: u16,
    /// The picker's ext_proc (gRPC) port on loopback.
    pub epp_port: u16,
    /// The pool's endpoints: only reached without the picker, failing open.
    pub workers: Vec<String>,
    /// `failure_mode_allow`: the InferencePool's `failureMode: FailOpen`
    /// (a request goes on without a pick when the picker is down); false
    /// is FailClose, the default (Envoy answers 500).
    pub fail_open: bool,
}

/// Every request through the ext_proc filter (headers, full-duplex
/// streamed bodies and trailers both ways, the picker's timeouts), then
/// routed by `x-gateway-destination-endpoint` to an ORIGINAL_DST cluster.
/// A request without that header (no pick: the picker down and failing
/// open) goes to the pool's endpoints round robin, as a gateway's
/// InferencePool backend does. The picker is health-checked over gRPC.
pub fn envoy_epp_config(e: &EppEnvoy) -> String {
    let EppEnvoy {
        port,
        admin_port,
        epp_port,
        workers,
        fail_open,
    } = e;
    let endpoints = endpoints_yaml(workers);
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: inference_gateway
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inference_gateway
          stream_idle_timeout: 0s
          route_config:
            virtual_hosts:
            - name: pool
              domains: ["*"]
              routes:
              - match: {{prefix: "/", headers: [{{name: x-gateway-destination-endpoint, present_match: true}}]}}
                route: {{cluster: original_destination, timeout: 0s}}
              - match: {{prefix: "/"}}
                route: {{cluster: pool, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {{cluster_name: endpoint_picker}}
                timeout: 10s
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: FULL_DUPLEX_STREAMED
                response_body_mode: FULL_DUPLEX_STREAMED
                request_trailer_mode: SEND
                response_trailer_mode: SEND
              message_timeout: 1000s
              failure_mode_allow: {fail_open}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: original_destination
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    original_dst_lb_config: {{use_http_header: true, http_header_name: x-gateway-destination-endpoint}}
    circuit_breakers:
      thresholds:
      - {{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100}}
  - name: endpoint_picker
    type: STATIC
    connect_timeout: 2s
    # A picker found down is taken out at once (no panic routing to it), so
    # the next request's stream fails before any body is sent: the point up
    # to which FULL_DUPLEX_STREAMED can still fail open.
    common_lb_config: {{healthy_panic_threshold: {{value: 0}}}}
    health_checks:
    - timeout: 1s
      interval: 1s
      no_traffic_interval: 1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check: {{service_name: envoy.service.ext_proc.v3.ExternalProcessor}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: endpoint_picker
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {epp_port}}}}}}}
  - name: pool
    type: STATIC
    lb_policy: ROUND_ROBIN
    connect_timeout: 2s
    load_assignment:
      cluster_name: pool
      endpoints:
      - lb_endpoints:
{endpoints}"#
    )
}
