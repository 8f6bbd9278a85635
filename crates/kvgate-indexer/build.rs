//! Generates the gRPC locality API from `proto/` with protox (a pure-Rust
//! protobuf compiler: no system `protoc`); the code stays in OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["kvgate/index/v1/index.proto"], ["proto"])?;
    // LocalityQuery carries a cache salt: its Debug (in grpc.rs) redacts it.
    tonic_prost_build::configure()
        .skip_debug(["kvgate.index.v1.LocalityQuery"])
        .compile_fds(fds)?;
    Ok(())
}
